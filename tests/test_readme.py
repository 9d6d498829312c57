"""The README's usage examples really run (blocks fenced as plain ```python; titled blocks need weights)."""

import re
from pathlib import Path

import pytest

import tokred
from tokred.errors import InvalidOptionError
from tokred.registry import methods

README = Path(__file__).resolve().parents[1] / "README.md"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", flags=re.S | re.M)


def test_readme_python_examples_run(monkeypatch):
    methods.names()  # the built-ins are registered before the snapshot
    monkeypatch.setattr(methods, "_items", dict(methods._items))  # methods the examples register end with the test
    text = README.read_text()
    blocks = PYTHON_BLOCK.findall(text)
    assert blocks, "README has no runnable python example"
    guide = text.split("\n## Writing a method\n")[1].split("\n## ")[0]
    (worked_example,) = PYTHON_BLOCK.findall(guide)  # the guide's one complete example is among them
    assert worked_example in blocks
    for code in blocks:
        namespace: dict = {}
        exec(compile(code, str(README), "exec"), namespace)
        if code == worked_example:
            # the plugin the guide writes is a registered method like any other, with checked options
            assert "random_kv" in tokred.list_methods()
            assert namespace["counts"] and namespace["patch"].active is False
            for bad, message in ((0, "leaves no key"), (1.5, "0 < keep <= 1"), ("half", "0 < keep <= 1")):
                with pytest.raises(InvalidOptionError, match=message):
                    tokred.apply(namespace["unet"], "random_kv", keep=bad)
            assert tokred.get_patch(namespace["unet"]) is None
