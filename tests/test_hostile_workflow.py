"""Hostile input at the workflow layer: config values and paths that a shell would misread.

Every value reaching a rule's shell command is quoted by Snakemake's `{x:q}` (shlex.quote).
The dry-run test executes every printed shell command under bash with a stand-in `voxelfm`
that records its argv and parses it with the real argument parser, so a path that splits at a
space, a quote that ends a JSON argument early, or a `$(...)` that runs, is seen without
paying for real ingestion or training.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT
from test_workflow import SNAKEMAKE, run_snakemake, write_config

# Awkward but legal names: a space, both quote kinds, a shell substitution and a glob.
HOSTILE_DIR_NAME = "res ults 'q\" $(touch PWNED) *"
INJECTED_LABEL = "y'$(touch PWNED)'"

# The stand-in tool: records argv (one JSON line per call) and parses it as `voxelfm` would.
RECORDING_VOXELFM = f"""#!{sys.executable}
import json, os, sys
sys.path.insert(0, {str(REPO_ROOT)!r})
from voxelfm.cli import build_parser
build_parser().parse_args(sys.argv[1:])
with open(os.environ["VOXELFM_ARGV_LOG"], "a") as record:
    record.write(json.dumps(sys.argv[1:]) + "\\n")
"""


def hostile_config(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A config whose results_dir, manifest path, adapter root and a task label are hostile."""
    base = tmp_path / HOSTILE_DIR_NAME
    user_manifest = base / "my cohort" / "manifest list.csv"
    user_manifest.parent.mkdir(parents=True)
    user_manifest.write_text("scan_id,patient_id,image\n")
    # No `$` here: an adapter root may name environment variables, expanded by the workflow.
    adapter_root = tmp_path / "down 'loaded' data"
    adapter_root.mkdir()
    config = write_config(
        tmp_path,
        **{
            "evaluation.tasks.liver_lesion.labels": [INJECTED_LABEL],
            "datasets.user": {"manifest": str(user_manifest)},
            "datasets.public": {
                "adapter": {
                    "name": "luna16",
                    "root": str(adapter_root),
                    "options": {"note": 'it\'s "quoted"'},
                }
            },
        },
    )
    data = yaml.safe_load(config.read_text())
    data["results_dir"] = str(base / "results")
    config.write_text(yaml.safe_dump(data))
    return config, base / "results", user_manifest


def shell_commands(dry_run_output: str) -> list[str]:
    return [
        line.removeprefix("Shell command: ")
        for line in dry_run_output.splitlines()
        if line.startswith("Shell command: ") and line != "Shell command: None"
    ]


def run_printed_commands(tmp_path: Path, config: Path, only: str = "") -> list[list[str]]:
    """Dry-run the workflow, run every printed shell command (those containing ``only``)
    under bash with the recording stand-in tool, and return the argv of each call."""
    result = run_snakemake("-n", "-p", "--configfile", str(config))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    commands = shell_commands(result.stdout)
    assert len(commands) > 20, result.stdout[-2000:]
    commands = [c for c in commands if only in c]
    # Snakemake makes log folders before a job runs; do the same so redirects can open.
    for log in re.findall(r"^    log: (.*)$", result.stdout, flags=re.MULTILINE):
        for path in log.split(", "):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "voxelfm"
    tool.write_text(RECORDING_VOXELFM)
    tool.chmod(0o755)
    argv_log = tmp_path / "argv.jsonl"
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env["VOXELFM_ARGV_LOG"] = str(argv_log)
    for command in commands:
        run = subprocess.run(
            ["bash", "-c", command],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert run.returncode == 0, f"{command}\n{run.stderr}"
    assert not list(tmp_path.rglob("PWNED")), "a config value ran as a shell command"
    calls = [json.loads(line) for line in argv_log.read_text().splitlines()]
    assert len(calls) == len(commands)
    return calls


def option(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_a_task_label_with_quotes_is_data_never_shell(tmp_path):
    config = write_config(tmp_path, **{"evaluation.tasks.liver_lesion.labels": [INJECTED_LABEL]})
    calls = run_printed_commands(tmp_path, config, only="liver_lesion")
    lesion_calls = [a for a in calls if a[0] == "probe" and "liver_lesion" in a]
    assert len(lesion_calls) == 3
    for argv in lesion_calls:
        assert json.loads(option(argv, "--task"))["labels"] == [INJECTED_LABEL]


def test_every_shell_command_keeps_hostile_paths_intact(tmp_path):
    config, results, user_manifest = hostile_config(tmp_path)
    calls = run_printed_commands(tmp_path, config)
    by_command: dict[str, list[list[str]]] = {}
    for argv in calls:
        by_command.setdefault(argv[0], []).append(argv)
    # Every path argument arrives whole: it names something under the hostile folder.
    for argv in calls:
        for arg in argv:
            if "res ults" in arg and not arg.startswith("{"):
                path = arg.rsplit("=", 1)[-1] if "=" in arg.split("/")[0] else arg
                assert path.startswith(str(tmp_path / HOSTILE_DIR_NAME)), (arg, argv)
    # The log redirects landed in the hostile folder.
    assert list((results / "logs").rglob("*.log")), "no log was written"

    (manifest_call,) = [a for a in by_command["manifest"] if option(a, "--source").endswith(".csv")]
    assert option(manifest_call, "--source") == str(user_manifest)
    (adapt_call,) = by_command["adapt"]
    assert option(adapt_call, "--root") == str(tmp_path / "down 'loaded' data")
    assert 'note=it\'s "quoted"' in adapt_call
    for argv in by_command["probe"]:
        if "liver_lesion" in argv:
            assert json.loads(option(argv, "--task"))["labels"] == [INJECTED_LABEL]
    for argv in by_command["summarize"]:
        assert Path(option(argv, "--out-dir")).parent.parent.parent == results
    for argv in by_command["report"]:
        for item in argv[argv.index("--results") + 1 : argv.index("--backbones")]:
            assert Path(item.split("=", 2)[2]).is_relative_to(results / "evaluation"), item


@pytest.mark.slow
def test_ingestion_runs_for_real_with_spaces_and_quotes_in_every_path(tmp_path):
    """A user manifest in a folder with a space, and a results_dir with a space and quotes:
    the real ingestion runs to its summary."""
    base = tmp_path / "my data 'x'"
    cohort = base / "cohort folder"
    subprocess.run(
        [sys.executable, "-m", "voxelfm", "synth", "--out", str(cohort), "--spec",
         json.dumps({"n_patients": 4, "seed": 1, "dicom_fraction": 0.25})],
        check=True, capture_output=True,
    )  # fmt: skip
    config = write_config(
        tmp_path,
        **{
            "datasets": {"mine": {"manifest": str(cohort / "manifest.csv")}},
            "pretrain.enabled": False,
            "evaluation.enabled": False,
        },
    )
    data = yaml.safe_load(config.read_text())
    data["results_dir"] = str(base / 'results "run" 1')
    config.write_text(yaml.safe_dump(data))
    result = run_snakemake("--cores", "2", "--configfile", str(config), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(
        (base / 'results "run" 1' / "data" / "mine" / "summary" / "summary.json").read_text()
    )
    assert summary, summary


@pytest.mark.slow
def test_readme_recovery_after_snakemake_itself_was_killed(tmp_path):
    """A SIGKILLed Snakemake leaves its lock (and an incomplete output): a plain rerun
    stops; the README's `--unlock` then `--rerun-incomplete` recovers."""
    readme = (REPO_ROOT / "README.md").read_text()
    assert "`snakemake --unlock`" in readme and "`--rerun-incomplete`" in readme
    config = write_config(
        tmp_path,
        **{
            "datasets.synthetic.synthetic.n_patients": 4,
            "pretrain.enabled": False,
            "evaluation.enabled": False,
        },
    )
    target = str(tmp_path / "results" / "synthetic" / "synthetic")
    job_log = tmp_path / "results" / "logs" / "synthesize_cohort" / "synthetic.log"
    # The target first: --configfile takes every following word.
    command = [*SNAKEMAKE, target, "--cores", "1", "--configfile", str(config)]
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, env={**os.environ, "PATH": f"{Path(sys.executable).parent}"
                                     f"{os.pathsep}{os.environ['PATH']}"},
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not job_log.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert process.poll() is None, "Snakemake ended before the job could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()

    plain = run_snakemake(target, "--cores", "1", "--configfile", str(config))
    assert plain.returncode != 0 and "--unlock" in plain.stdout + plain.stderr
    assert run_snakemake(target, "--unlock", "--configfile", str(config)).returncode == 0
    recovered = run_snakemake(
        target, "--cores", "1", "--rerun-incomplete", "--configfile", str(config)
    )
    assert recovered.returncode == 0, recovered.stderr[-2000:]
    assert (Path(target) / "manifest.csv").is_file()
