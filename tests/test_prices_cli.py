"""`tollway prices` as an operator uses it: a model's every price, the list, a table update."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from .tollway_up import tollway

# A LiteLLM map, small and by hand: a first-party model with every kind of tier, a
# snapshot priced as it, and a reseller's entry the shipped-style table leaves out.
GPT_9 = {
    "input_cost_per_token": 2e-06,
    "output_cost_per_token": 8e-06,
    "cache_read_input_token_cost": 5e-07,
    "input_cost_per_audio_token": 4e-05,
    "input_cost_per_token_above_272k_tokens": 4e-06,
    "input_cost_per_token_flex": 1e-06,
    "output_cost_per_token_flex": 4e-06,
    "input_cost_per_token_priority": 3.5e-06,
    "output_cost_per_token_priority": 1.4e-05,
    "litellm_provider": "openai",
    "mode": "chat",
}
LITELLM = {
    "sample_spec": {"input_cost_per_token": 0, "litellm_provider": "one of..."},
    "gpt-9": GPT_9,
    "gpt-9-2026-01-01": GPT_9,
    "fireworks_ai/gpt-9": {"input_cost_per_token": 1e-07, "litellm_provider": "fireworks_ai"},
}


def test_a_model_shows_every_price_that_applies_to_it(tmp_path: Path) -> None:
    shown = tollway("prices", "gemini-2.5-pro", "claude-sonnet-4-5-20250929", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert "gemini-2.5-pro: gemini-2.5-pro (input 1.25, output 10)" in out
    assert "source: litellm:gemini/gemini-2.5-pro; provider: gemini" in out
    header = next(line for line in out.splitlines() if "USD per 1M tokens" in line)
    for column in ("standard", "standard >200k", "flex", "priority", "priority >200k", "batch"):
        assert f" {column} " in f"{header} ", column
    assert re.search(r"^\s+input\s+1\.25\s+2\.5\s", out, re.M)
    assert ">200k: above 200,000 input tokens" in out
    assert "claude-sonnet-4-5-20250929: claude-sonnet-4-5" in out
    assert re.search(r"^\s+cache write 1h\s+6\s", out, re.M)
    assert "source: litellm:claude-sonnet-4-5, tollway" in out  # Tollway's long-context fix


def test_a_name_not_priced_exits_1(tmp_path: Path) -> None:
    shown = tollway("prices", "gpt-4o", "llama3:8b", cwd=tmp_path)
    assert shown.returncode == 1
    assert "llama3:8b: not priced" in shown.stdout and "gpt-4o: gpt-4o" in shown.stdout


def test_the_list_says_where_prices_came_from_and_names_the_tiers(tmp_path: Path) -> None:
    listing = tollway("prices", cwd=tmp_path)
    assert listing.returncode == 0
    lines = listing.stdout.splitlines()
    assert re.match(r"USD per 1M tokens; price table last updated 20\S+ from LiteLLM \S", lines[0])
    assert lines[1].split()[-1] == "TIERS"
    assert re.search(
        r"^gemini-2\.5-pro\s.*>200k: 2\.5/15\s+flex,priority,batch$", listing.stdout, re.M
    )
    assert re.search(r"^vertex_ai/gemini-2\.5-pro\s+vertex_ai\s", listing.stdout, re.M)


def test_an_update_writes_a_table_that_pricing_table_file_reads(tmp_path: Path) -> None:
    source = tmp_path / "litellm.json"
    source.write_text(json.dumps(LITELLM))
    table = tmp_path / "prices.yaml"
    args = ("--update-from", str(source), "--output", str(table), "--litellm-version", "9.9")
    written = tollway("prices", *args, cwd=tmp_path)
    assert written.returncode == 0, written.stderr
    assert f"to {table}" in written.stdout
    # A correction of a model this map lacks is left out, and said so.
    assert "overrides.yaml corrects babbage-002, not in the file" in written.stderr
    data = yaml.safe_load(table.read_text())
    assert data["litellm_version"] == "9.9" and data["last_updated"][:2] == "20"
    assert "fireworks_ai/gpt-9" not in data["models"]
    assert "claude-opus-4-1" in data["models"]  # Tollway's overrides are applied
    config = tmp_path / "tollway.yaml"
    config.write_text(yaml.safe_dump({"pricing": {"table_file": "prices.yaml"}}))
    shown = tollway("prices", "-c", str(config), "gpt-9-2026-01-01", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "gpt-9-2026-01-01: gpt-9 (input 2, output 8)" in shown.stdout
    assert re.search(r"^\s+audio input\s+40\s", shown.stdout, re.M)
    assert tollway("check-config", str(config), cwd=tmp_path).returncode == 0


def test_a_bad_update_or_table_file_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "litellm.json"
    bad.write_text("{nope")
    out = tmp_path / "prices.yaml"
    update = tollway("prices", "--update-from", str(bad), "--output", str(out), cwd=tmp_path)
    assert update.returncode == 2 and "litellm.json: not valid JSON" in update.stderr
    assert not out.exists()
    both = tollway("prices", "--update-from", str(bad), "gpt-4o", cwd=tmp_path)
    assert both.returncode == 2 and "name no models" in both.stderr
    config = tmp_path / "tollway.yaml"
    config.write_text("pricing: {table_file: missing.yaml}\n")
    checked = tollway("check-config", str(config), cwd=tmp_path)
    assert checked.returncode == 2 and "missing.yaml: cannot read" in checked.stderr
