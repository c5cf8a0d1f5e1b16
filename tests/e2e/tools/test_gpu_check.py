"""tools/gpu_check.py proven where no GPU is: ``--cpu-smoke`` runs the same orchestration (a process per
section, every case of the train, bench and throughput sections, the table and the JSON line) at toy
sizes on CPU; a failing case is named and the cases after it still run."""
import json

from tools import gpu_check


def test_cpu_smoke_runs_every_section_and_prints_one_json_line(capsys):
    assert gpu_check.main(["--cpu-smoke"]) == 0
    out = capsys.readouterr().out
    line = [l for l in out.splitlines() if l.startswith("gpu_check_json: ")]
    assert len(line) == 1
    summary = json.loads(line[0].split(": ", 1)[1])
    assert summary["failed"] == []
    cases = {(c["section"], c["case"]) for c in summary["cases"]}
    expected = {("tests", "gpu_only_tests"), ("train", "tiny_mixed/stages_agree"), ("train", "tiny_mixed/save_resume")}
    expected |= {("train", f"tiny_mixed/{stage}") for stage in gpu_check.STAGES}
    expected |= {("bench", name) for name in gpu_check.BENCHES}
    expected |= {("throughput", f"{m}/{mode}") for m in gpu_check.MODELS for mode in ("eager", "compile")}
    assert cases == expected
    by_case = {(c["section"], c["case"]): c for c in summary["cases"]}
    assert by_case[("train", "tiny_mixed/save_resume")]["max_rel_diff"] == 0  # exact resume
    assert all(by_case[("throughput", f"{m}/eager")]["tokens_per_s"] > 0 for m in gpu_check.MODELS)
    assert "| throughput | moe/compile | ok |" in out


def test_a_failing_case_is_named_and_the_next_one_runs(tmp_path, monkeypatch):
    name, (module, _, smoke_argv) = "attention", gpu_check.BENCHES["attention"]
    monkeypatch.setattr(gpu_check, "BENCHES", {"broken": (module, [], ["--device=nonsense"]),
                                               name: (module, [], smoke_argv)})
    result = tmp_path / "bench.jsonl"
    gpu_check.section_bench(True, tmp_path, result)
    cases = [json.loads(line) for line in result.read_text().splitlines()]
    assert [(c["case"], c["ok"]) for c in cases] == [("broken", False), ("attention", True)]
    assert "nonsense" in cases[0]["error"]
    assert "| bench | broken | FAILED |" in "\n".join(gpu_check.table(cases))
