"""The README's usage examples really run (blocks fenced as plain ```python; titled blocks need weights)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)
    assert blocks, "README has no runnable python example"
    for code in blocks:
        exec(compile(code, str(README), "exec"), {})
