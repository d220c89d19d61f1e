"""configs/ into the wheel as dlrun/configs/ (the rest of the build is pyproject.toml's).

The configs stay one copy at the top of the repository; a wheel carries them as package data of
dlrun, so an installed dlrun adds no top-level name to site-packages. An editable install copies
nothing: dlrun/config/compose.py finds the checkout's configs/ itself.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CONFIGS = Path("configs")  # setuptools runs this file from the project root (or an sdist's)


class BuildPyWithConfigs(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "dlrun" / "configs"
        if target.exists():  # a reused build/ folder: no config deleted since may linger
            shutil.rmtree(target)
        shutil.copytree(CONFIGS, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildPyWithConfigs})
