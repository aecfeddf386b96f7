"""bench/capacity_sim.py: the capacity model behaves like a cluster (short seeded runs, no timings)."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench import capacity_sim  # noqa: E402

# Heavy load for few nodes: ~20 live calls on average (12/min x 100 s), 4 per node.
HEAVY = ["--rate", "12", "--peak-factor", "1.5", "--peak-start", "200", "--peak-end", "400", "--duration", "600",
         "--call-mean-s", "100", "--seed", "7"]


def simulate(*argv: str) -> dict:
    return capacity_sim.run(capacity_sim.build_parser().parse_args(list(argv)))


def test_more_nodes_never_refuse_more_or_answer_slower() -> None:
    rows = simulate(*HEAVY, "--nodes", "1", "2", "4", "8")["rows"]
    assert [r["nodes"] for r in rows] == [1, 2, 4, 8]
    assert len({r["calls_offered"] for r in rows}) == 1  # the same callers for every node count
    assert rows[0]["calls_refused"] > 0  # one node cannot take this load
    for fewer, more in itertools.pairwise(rows):
        assert more["calls_refused"] <= fewer["calls_refused"]
        assert more["calls_admitted"] >= fewer["calls_admitted"]
        assert more["first_audio_p95_ms"] <= fewer["first_audio_p95_ms"] * 1.1  # monotonic within 10 %
        assert more["cpu_utilisation"] <= fewer["cpu_utilisation"] * 1.1
    assert rows[-1]["refusal_rate"] < rows[0]["refusal_rate"]
    # An idle turn is never faster than the measured first-audio path on an idle node.
    d = capacity_sim.DEFAULTS
    floor_ms = 1000 * (d["vad_wait_s"] + d["output_s"])
    assert all(r["first_audio_p50_ms"] > floor_ms for r in rows)


def test_node_loss_drops_its_calls_and_the_rest_go_on() -> None:
    base = simulate(*HEAVY, "--nodes", "3")["rows"][0]
    lost = simulate(*HEAVY, "--nodes", "3", "--fail-at", "300", "--fail-node", "1")["rows"][0]
    assert base["calls_dropped"] == 0
    assert 0 < lost["calls_dropped"] <= 4  # only the lost node's calls: at most its max_sessions
    assert lost["turns_after_failure"] > 0  # the two other nodes keep answering
    assert lost["calls_completed"] > 0
    # Fewer nodes after the loss: more callers refused than with all three.
    assert lost["calls_refused"] >= base["calls_refused"]
    assert base["turns_after_failure"] is None


def test_same_seed_same_result_and_other_seed_differs() -> None:
    a = simulate(*HEAVY, "--nodes", "2")
    b = simulate(*HEAVY, "--nodes", "2")
    assert a["rows"] == b["rows"]
    c = simulate(*HEAVY[:-1], "8", "--nodes", "2")
    assert c["rows"] != a["rows"]


def test_main_prints_one_table_and_writes_the_documented_json(tmp_path: Path, capsys) -> None:
    path = tmp_path / "sim.json"
    capacity_sim.main([*HEAVY, "--nodes", "1", "2", "--duration", "300", "--json", str(path)])
    out = capsys.readouterr().out
    assert out.count(capacity_sim.HEAD) == 1
    data = json.loads(path.read_text())
    assert data["seed"] == 7
    assert data["fields"] == list(capacity_sim.RESULTS_FIELDS)
    assert set(data["demands"]) == set(capacity_sim.DEFAULTS)
    assert data["demands_source"]["source_json"] == capacity_sim.DEFAULT_SOURCE_JSON
    assert [r["nodes"] for r in data["rows"]] == [1, 2]
    for row in data["rows"]:
        assert set(capacity_sim.RESULTS_FIELDS) <= set(row)
        assert row["redis_ops_per_s"] > 0


def test_demands_from_a_concurrency_json(tmp_path: Path) -> None:
    """--from-json reads bench/concurrency.py's voice format: stages from the lowest N, CPU over all rows."""
    row = {"n": 1, "turns_ok": 2, "server_cpu_s": 8.0, "v2v_p50_ms": 2000.0,
           "server_waterfall_median_ms": {"speech_stopped": 500.0, "stt_done": 700.0, "prompt_ready": 700.0,
                                          "llm_first_token": 1200.0, "first_clause": 1700.0,
                                          "tts_first_chunk": 1800.0, "audio_out": 1810.0}}
    path = tmp_path / "concurrency.json"
    path.write_text(json.dumps({"mode": "voice", "rows": [row, {**row, "n": 4, "turns_ok": 8, "server_cpu_s": 32.0}]}))
    d = capacity_sim.defaults_from_json(path)
    assert abs(d["stt"] - 0.2) < 1e-9 and abs(d["llm_prefill"] - 0.5) < 1e-9
    assert abs(d["output_s"] - 0.2) < 1e-9
    assert abs(d["cpu_per_turn_s"] - 4.0) < 1e-9
    rows = simulate("--from-json", str(path), "--nodes", "1", "--duration", "120", "--rate", "2")["rows"]
    assert rows[0]["turns"] > 0
