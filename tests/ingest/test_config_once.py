"""Each configuration is declared once: the validation layer checks a pipeline's tables against the dataclasses the
stages use, not against twins that could drift from them."""

from __future__ import annotations

from dataclasses import fields

import pytest

from geomap.capture.config import CaptureConfig
from geomap.errors import GeomapError
from geomap.ingest.engine_config import EngineConfig
from geomap.ingest.pipeline import load_pipeline
from geomap.ingest.schema import CaptureSchema, PipelineSchema, capture_config


def test_the_schema_of_each_table_is_the_stages_own_dataclass():
    assert PipelineSchema.model_fields["engine"].annotation is EngineConfig
    assert PipelineSchema.model_fields["capture"].annotation is CaptureSchema
    assert issubclass(CaptureSchema, CaptureConfig)
    assert [f.name for f in fields(CaptureSchema)] == [*(f.name for f in fields(CaptureConfig)), "vector_dtype"]


@pytest.mark.parametrize("table, key", [("kind = 'spark'", "engine.kind"), ("threads = 0", "engine.threads"),
                                        ("shards = ''", "engine.shards"), ("gpus = 1", "unknown key 'engine.gpus'")])
def test_an_engine_table_is_judged_by_the_same_layer_as_the_rest(tmp_path, table, key):
    (tmp_path / "p.txt").write_text("hi\n")
    path = tmp_path / "x.toml"
    path.write_text(f"[[sources]]\npath = 'p.txt'\n[engine]\n{table}\n")
    with pytest.raises(GeomapError) as caught:
        load_pipeline(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and key in message and "\n" not in message


def test_capture_options_keep_their_canonical_key():
    config, dtype = capture_config({"layers": "all", "attn_positions": [0, -1], "vector_dtype": "bfloat16"})
    assert type(config) is CaptureConfig and dtype == "bfloat16"
    assert config == CaptureConfig(attn_positions=(0, -1))
    assert config.to_json() == CaptureConfig(attn_positions=[0, -1], layers=None).to_json()
