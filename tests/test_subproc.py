from __future__ import annotations

import sys

import pytest
from subproc import run


def test_a_hung_command_fails_with_its_stack() -> None:
    code = "import time\ndef waits_forever():\n    time.sleep(60)\nwaits_forever()"
    with pytest.raises(pytest.fail.Exception, match=r"(?s)still ran after 2 s.*waits_forever"):
        run([sys.executable, "-c", code], timeout=2)


def test_a_finished_command_is_returned() -> None:
    r = run([sys.executable, "-c", "import sys; print('out'); sys.exit(3)"], timeout=60)
    assert (r.returncode, r.stdout) == (3, "out\n")
