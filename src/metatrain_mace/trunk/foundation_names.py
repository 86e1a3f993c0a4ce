"""MACE foundation models by name (``mace_mp:medium-mpa-0``, ``mace_off:small``,
``mace_omol:extra_large``, ``mh-1``, ``mace_anicc``), resolved through mace-torch's
own tables.

mace-torch keeps the download addresses of its foundation models in
``mace.calculators.foundations_models`` and caches downloads in
``mace.tools.utils.get_cache_dir()`` (``$XDG_CACHE_HOME/mace``, else
``~/.cache/mace``). A name is looked up there; a model already in the cache is
used as it is, and one that is not is downloaded by mace-torch's own downloader
(this is the only network access of the package, and only when a name is given).
"""

import difflib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional


FAMILIES = ("mace_mp", "mace_off", "mace_omol", "mace_anicc")


@dataclass
class FoundationModel:
    """One named model: mace-torch family, name, address and default head."""

    family: str
    name: str
    url: str
    # the head mace-torch's calculator function selects (None: MACECalculator's
    # rule, the only head or the one named "default")
    head: Optional[str] = None

    @property
    def label(self) -> str:
        return f"{self.family}:{self.name}"

    def cache_file(self) -> Path:
        """Where mace-torch keeps (or will keep) this model after downloading it."""
        from mace.tools.utils import get_cache_dir

        basename = os.path.basename(self.url)
        if self.family == "mace_anicc":
            # mace_anicc() keeps its model inside mace-torch's own folder
            from mace.calculators import foundations_models

            folder = Path(foundations_models.module_dir) / "foundations_models"
            return folder / basename
        if self.family == "mace_mp":
            # download_mace_mp_checkpoint keeps letters, digits and "_" only
            basename = "".join(c for c in basename if c.isalnum() or c in "_")
        else:
            basename = basename.split("?")[0]
        return Path(get_cache_dir()) / basename


def _omol_urls() -> Dict[str, str]:
    """MACE-OMOL's table lives inside ``mace_omol()`` in mace-torch: read its
    addresses from the function's constants instead of copying them."""
    from mace.calculators.foundations_models import mace_omol

    constants = mace_omol.__code__.co_consts
    urls = [c for c in constants if isinstance(c, str) and c.startswith("http")]
    names = {}
    for url in urls:
        if url.endswith(".model") and "extra-large" in url:
            names["extra_large"] = url
    return names


def _anicc_urls() -> Dict[str, str]:
    """The address of mace_anicc's model, read from ``mace_anicc()``'s constants
    (the table lives inside the function, as MACE-OMOL's)."""
    from mace.calculators.foundations_models import mace_anicc

    constants = mace_anicc.__code__.co_consts
    urls = [c for c in constants if isinstance(c, str) and c.startswith("http")]
    return {os.path.basename(url).removesuffix(".model"): url for url in urls}


def registry() -> Dict[str, FoundationModel]:
    """Every named model mace-torch knows, as ``family:name``."""
    from mace.calculators import foundations_models

    models = [
        FoundationModel("mace_mp", name, url)
        for name, url in foundations_models.mace_mp_urls.items()
    ]
    models += [
        FoundationModel("mace_off", name, url)
        for name, url in foundations_models.mace_off_urls.items()
    ]
    models += [
        FoundationModel("mace_omol", name, url, head="omol")
        for name, url in _omol_urls().items()
    ]
    models += [
        FoundationModel("mace_anicc", name, url) for name, url in _anicc_urls().items()
    ]
    return {model.label: model for model in models}


def _only_model_of(family: str) -> Optional[FoundationModel]:
    """The model of a family that has a single one (``mace_anicc``)."""
    members = [m for m in registry().values() if m.family == family]
    return members[0] if len(members) == 1 else None


def valid_names() -> List[str]:
    """The names accepted in ``mace_model``: ``family:name``, and the bare name
    where only one family has it."""
    models = registry()
    names = list(models)
    bare = [model.name for model in models.values()]
    names += sorted(name for name in set(bare) if bare.count(name) == 1)
    names += [family for family in FAMILIES if _only_model_of(family) is not None]
    return names


def lookup(name: str) -> Optional[FoundationModel]:
    """The model called ``name``, None when ``name`` is not a model name.

    :raises ValueError: for a bare name several families have (``small``).
    """
    models = registry()
    if name in models:
        return models[name]
    if name in FAMILIES and _only_model_of(name) is not None:
        return _only_model_of(name)
    matches = [model for model in models.values() if model.name == name]
    if len(matches) > 1:
        raise ValueError(
            f"'mace_model: {name}' names several MACE foundation models: "
            + ", ".join(repr(m.label) for m in matches)
            + "; choose one"
        )
    return matches[0] if matches else None


def looks_like_a_name(value: str) -> bool:
    """Names have no directory separator and no file extension."""
    return "/" not in value and os.sep not in value and "." not in value


def resolve(value: str) -> FoundationModel:
    """The foundation model named ``value``; refuses unknown names, listing the
    valid ones."""
    model = lookup(value)
    if model is None:
        names = valid_names()
        close = closest_names(value, names)
        hint = f" Did you mean {' or '.join(repr(n) for n in close)}?" if close else ""
        others = [name for name in names if name not in close]
        raise ValueError(
            f"'mace_model: {value}' is neither a file nor a MACE foundation model "
            f"name known to mace-torch.{hint} Valid names: "
            f"{', '.join(close + others)}"
        )
    return model


def closest_names(value: str, names: List[str]) -> List[str]:
    """The names most like ``value`` (a misspelt one), closest first: similar as
    ``difflib`` measures it (a bare name is also compared without the family
    prefix), or containing ``value``."""
    value = value.lower()
    scores: Dict[str, float] = {}
    for name in names:
        candidates = [name.lower()]
        if ":" not in value:
            candidates.append(name.lower().split(":")[-1])
        score = max(
            difflib.SequenceMatcher(None, value, candidate).ratio()
            for candidate in candidates
        )
        if value in name.lower():
            score = max(score, 0.8)
        scores[name] = score
    ranked = sorted(names, key=lambda name: -scores[name])
    return [name for name in ranked if scores[name] >= 0.6][:3]


def fetch(model: FoundationModel) -> Path:
    """The model file in mace-torch's cache, downloaded first if it is not there.

    :raises RuntimeError: when the download fails (no network), naming the address
        and where to put the file by hand.
    """
    path = model.cache_file()
    if path.is_file():
        logging.info(f"Using {model.label} from mace-torch's cache: {path}")
        return path
    logging.info(
        f"Downloading {model.label} from {model.url} into mace-torch's cache "
        f"{path.parent} (MACE foundation models are distributed under their own "
        "licenses, see mace-torch's documentation)"
    )
    try:
        from mace.calculators import foundations_models

        if model.family == "mace_mp":
            path = Path(foundations_models.download_mace_mp_checkpoint(model.name))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            foundations_models._urlretrieve_with_timeout(model.url, str(path))
    except Exception as err:
        if path.exists() and path.stat().st_size == 0:
            path.unlink()
        raise RuntimeError(
            f"could not download the MACE foundation model {model.label} from "
            f"{model.url} ({type(err).__name__}: {err}). Without network access, "
            f"download that file elsewhere and put it at {path} (or set "
            "'mace_model' to the file's path)"
        ) from err
    if not path.is_file():
        raise RuntimeError(
            f"mace-torch downloaded {model.label}, but not to {path}; set "
            "'mace_model' to the downloaded file's path"
        )
    return path
