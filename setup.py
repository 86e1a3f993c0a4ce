"""Ship ``metatrain_mace_hook.pth`` at the root of site-packages.

Everything else lives in ``pyproject.toml``. setuptools has no declarative way to
put a ``.pth`` file next to the packages, so ``build_py`` copies it into regular
wheels, and ``editable_wheel`` adds it to the editable wheel of ``pip install -e .``
(the hook module itself is then found through the editable path entry, which sorts
before it).
"""

import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel


PTH_NAME = "metatrain_mace_hook.pth"
PTH_SOURCE = os.path.join("src", PTH_NAME)


class build_py_with_pth(build_py):
    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            self.copy_file(PTH_SOURCE, os.path.join(self.build_lib, PTH_NAME))

    def get_outputs(self, include_bytecode: bool = True) -> list:
        outputs = super().get_outputs(include_bytecode)
        if self.editable_mode:
            return outputs
        return [*outputs, os.path.join(self.build_lib, PTH_NAME)]


class _StrategyWithPth:
    """Wrap setuptools' editable strategy to also write the hook ``.pth``."""

    def __init__(self, strategy) -> None:
        self.strategy = strategy

    def __call__(self, wheel, files, mapping) -> None:
        self.strategy(wheel, files, mapping)
        wheel.writestr(PTH_NAME, Path(PTH_SOURCE).read_bytes())

    def __enter__(self):
        self.strategy.__enter__()
        return self

    def __exit__(self, *exc_info):
        return self.strategy.__exit__(*exc_info)


class editable_wheel_with_pth(editable_wheel):
    def _select_strategy(self, name, tag, build_lib):
        return _StrategyWithPth(super()._select_strategy(name, tag, build_lib))


setup(
    cmdclass={
        "build_py": build_py_with_pth,
        "editable_wheel": editable_wheel_with_pth,
    }
)
