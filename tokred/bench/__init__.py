"""tokred's benchmark suite: task protocol, timing and statistics, results files, the ``tokred`` CLI and the
pytest plugin. Needs the ``bench`` extra (``pip install "tokred[bench]"``); the core (:mod:`tokred`) does not
import this package."""
