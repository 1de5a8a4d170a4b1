"""Bad input gets a clear error naming the problem; in a batch, the other prompts proceed."""

from __future__ import annotations

import numpy as np
import pytest

from geomap.capture import CaptureConfig, Journey, PromptFailure, capture
from geomap.capture.prompts import read_prompt_lines
from geomap.errors import PromptError


@pytest.fixture
def llama(tiny_models):
    return tiny_models["llama"]


def test_empty_prompts_are_reported_and_the_batch_proceeds(llama):
    results = capture(llama, ["The storm is", "", "   \n", "Paris"], batch_size=4)
    assert [type(r) for r in results] == [Journey, PromptFailure, PromptFailure, Journey]
    assert results[1].index == 1 and "empty" in results[1].reason
    assert results[3].text == "Paris"


def test_too_long_prompt_errors_by_default_and_truncates_on_request(llama):
    window = llama.anatomy.context_window
    long_text = "storm " * (window + 10)
    (failure,) = capture(llama, [long_text])
    assert isinstance(failure, PromptFailure)
    assert "context window" in failure.reason and str(window) in failure.reason
    (journey,) = capture(llama, [long_text], CaptureConfig(overflow="truncate"))
    assert journey.truncated and len(journey.tokens) == window
    assert journey.tokens.ids[0] == llama.tokenizer.bos_token_id  # BOS kept at position 0
    full = llama.tokenizer(long_text)["input_ids"]
    assert journey.tokens.ids[1:].tolist() == full[-(window - 1):]


def test_invalid_utf8_file_names_file_and_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"The storm is\n\nvalid line\n\xc3\x28 broken\n")
    with pytest.raises(PromptError, match=r"prompts\.txt, line 4: not valid UTF-8"):
        read_prompt_lines(path)
    good = tmp_path / "good.txt"
    good.write_text("The storm is\n\n  \nParis\n", encoding="utf-8")
    assert read_prompt_lines(good) == ["The storm is", "Paris"]


def test_bad_capture_options_are_refused():
    with pytest.raises(ValueError, match="attn_positions"):
        CaptureConfig(attn_positions="first")
    with pytest.raises(ValueError, match="overflow"):
        CaptureConfig(overflow="drop")


def test_positions_outside_the_prompt_are_refused(llama):
    with pytest.raises(ValueError, match="outside"):
        capture(llama, ["Paris"], CaptureConfig(attn_positions=(40,)))


def test_explicit_positions_and_layers(llama):
    (j,) = capture(llama, ["The storm is coming"], CaptureConfig(attn_positions=(0, -1), lens_positions=(-2,),
                                                                  layers=(0, 2, -1)))
    n = len(j.tokens)
    assert j.attention.positions.tolist() == [0, n - 1]
    assert j.lens.positions.tolist() == [n - 2]
    assert j.lens.layers.tolist() == [0, 2, 3] and j.attention.layers.tolist() == [0, 2]
    assert np.isfinite(j.lens.kl_to_final).all()
