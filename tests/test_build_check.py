"""The built extension records its torch, and a mismatched torch is refused with both versions named."""

import pytest
import torch

from mosx import _build_check


def test_build_records_the_torch_it_was_compiled_against():
    from mosx._build_info import TORCH_VERSION

    assert TORCH_VERSION == torch.__version__


def test_mismatched_torch_names_both_versions_and_the_fix():
    from mosx._build_info import TORCH_VERSION

    with pytest.raises(ImportError) as e:
        _build_check.check_torch_version("2.0.0+cpu")
    msg = str(e.value)
    assert TORCH_VERSION in msg and "2.0.0+cpu" in msg and _build_check.FIX in msg
    _build_check.check_torch_version(TORCH_VERSION)  # the matching version passes
