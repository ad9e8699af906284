"""components/__init__.py lists every component folder (each folder with a component.py or an executor.py)."""

import os
import re

import components

ROOT = os.path.dirname(os.path.abspath(components.__file__))


def test_package_docstring_lists_every_component_folder():
    folders = sorted(name for name in os.listdir(ROOT)
                     if os.path.isdir(os.path.join(ROOT, name))
                     and any(os.path.isfile(os.path.join(ROOT, name, f)) for f in ("component.py", "executor.py")))
    listed = sorted(re.findall(r"^    (\w+)/", components.__doc__, flags=re.MULTILINE))
    assert len(folders) == 7 and listed == folders, (listed, folders)
