"""The README's main command: the demo runs and reports what it kept; the CLI refuses bad options clearly."""

from typer.testing import CliRunner

from dynamic_llava.cli import app
from dynamic_llava.demo import run_demo


def test_demo_reports_kept_tokens_and_kv_savings():
    result = run_demo(max_new_tokens=6, image_keep_rate=0.2, repeats=1, show=False)
    per_image = result["tokens_per_image"]
    assert result["image_tokens"] == [per_image] * 3
    assert result["image_tokens_kept"] == [int(0.2 * per_image)] * 3
    assert all(dyn < dense for dyn, dense in zip(result["kv_bytes_dynamic"], result["kv_bytes_dense"]))
    assert result["batch_kv_bytes_dynamic"] < result["batch_kv_bytes_dense"]
    k = result["sparse_layer"]
    assert result["kv_lengths_dynamic"][:k] == result["kv_lengths_dense"][:k]


def test_cli_rejects_bad_keep_rate_without_traceback():
    outcome = CliRunner().invoke(app, ["demo", "--image-keep-rate", "1.5"])
    assert outcome.exit_code == 2
    assert "--image-keep-rate must be in (0, 1]" in outcome.output
    assert "Traceback" not in outcome.output
