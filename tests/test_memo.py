"""The audit's memo: a step computed once per set of inputs, and forgotten between audits."""

from __future__ import annotations

import numpy as np

from clicooper_bus.ml.attacks import memo


def test_the_same_inputs_compute_once_and_other_inputs_again():
    memo.clear()
    calls = []

    def compute(tag):
        calls.append(tag)
        return tag

    a, b = np.zeros((3, 4), np.float32), np.zeros((3, 4), np.float32)
    assert memo.once(memo.digest("step", a, 1), lambda: compute("first")) == "first"
    assert memo.once(memo.digest("step", b, 1), lambda: compute("again")) == "first"
    b[0, 0] = 1e-30  # one element, one ulp-sized change: another key
    assert memo.once(memo.digest("step", b, 1), lambda: compute("other")) == "other"
    # the same bytes as another dtype or shape, or another setting, are other inputs too
    assert memo.digest("step", a, 1) != memo.digest("step", a.reshape(4, 3), 1)
    assert memo.digest("step", a, 1) != memo.digest("step", a.view(np.int32), 1)
    assert memo.digest("step", a, 1) != memo.digest("step", a, 2)
    memo.clear()
    assert memo.once(memo.digest("step", a, 1), lambda: compute("cleared")) == "cleared"
    assert calls == ["first", "other", "cleared"]


def test_a_config_with_a_date_is_a_named_error_not_a_crash():
    import pytest

    from clicooper_bus.audit.auditor import file_digest
    from clicooper_bus.errors import ClicooperError

    with pytest.raises(ClicooperError, match="holds a value no configuration has"):
        file_digest("[run]\nid = 1979-05-27\n")
