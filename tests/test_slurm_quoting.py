"""Values rendered into the Slurm batch script stay values, whatever they hold.

The script has two readers: bash, for its shell lines, and sbatch, for its ``#SBATCH`` lines.
Here hostile values (command substitutions, backticks, ``;``, quotes, spaces, ``#``, ``%``) are
rendered and read back by both: bash runs the script with ``srun``, ``scontrol``, ``sinfo`` and
the launcher shadowed by functions that record their arguments, and a model of sbatch's own
tokenizer (both its current form and the older one without single quotes) reads the
directives. Each must give back exactly the original value and run nothing. A value that would
break a line, or that sbatch would misread, is refused with one line naming its key.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import small_overrides
from launchers import REPO, sci_scale_cli

from sci_scale.config import Config, ConfigError, load_config
from sci_scale.launch.slurm import (
    SubmitOptions,
    launcher_words,
    render_script,
    sbatch_quote,
)

# What a hostile value holds: each part would run something, split a word, start a comment or
# expand, if it were rendered unquoted.
HOSTILE = "a b $(touch {m}) `touch {m}`; touch {m} && 'sq' \"dq\" $HOME ${{X}} %j #c * ?"


def sbatch_tokens(line: str, single_quotes: bool = True) -> list[str]:
    """The arguments sbatch reads from one script line after ``#SBATCH`` (src/sbatch/opt.c,
    ``_get_argument``): whitespace splits, a backslash escapes any character, quotes group and
    are dropped, an unquoted ``#`` ends the line. Releases before single-quote support
    (``single_quotes=False``) group with double quotes only and end at ``#`` even in them."""
    rest, tokens = line.removeprefix("#SBATCH"), []
    i = 0
    while True:
        while i < len(rest) and rest[i].isspace():
            i += 1
        if i >= len(rest):
            return tokens
        token, quote, comment = [], "", False
        while i < len(rest) and (quote or not rest[i].isspace()):
            char = rest[i]
            i += 1
            if char == "\\" and i < len(rest):
                token.append(rest[i])
                i += 1
            elif quote and char == quote:
                quote = ""
            elif char == "#" and (not quote or not single_quotes):
                comment = True
                break
            elif quote:
                token.append(char)
            elif char == '"' or (char == "'" and single_quotes):
                quote = char
            else:
                token.append(char)
        assert not quote, f"sbatch would stop at an unmatched {quote} in {line!r}"
        if not token:  # sbatch reads an empty argument as the end of the line
            return tokens
        tokens.append("".join(token))
        if comment:
            return tokens


def sbatch_directives(script: str, single_quotes: bool = True) -> list[str]:
    """The options sbatch takes from a script: #SBATCH lines up to the first line of commands."""
    options = []
    for line in script.splitlines()[1:]:
        if line.startswith("#SBATCH"):
            tokens = sbatch_tokens(line, single_quotes)
            assert len(tokens) == 1, f"{line!r} is read as {tokens}"
            options.extend(tokens)
        elif line.strip() and not line.startswith("#"):
            break
    assert options and len(options) == script.count("\n#SBATCH"), "a directive is past commands"
    return options


def option(directives: list[str], name: str) -> str:
    (value,) = [d.split("=", 1)[1] for d in directives if d.split("=", 1)[0] == name]
    return value


# srun, scontrol, sinfo and the launcher as shell functions that record their arguments
# (fields end with US, calls with RS; the values cannot hold either, being free of controls).
HARNESS = r"""
rec() { printf '%s\x1f' "$@" >> "$REC"; printf '\x1e' >> "$REC"; }
srun() { rec srun "$@"; }
scontrol() { rec scontrol "$@"; [ "$1" != show ] || echo node1; }
sinfo() { rec sinfo "$@"; echo 10.0.0.1; }
fake-sci-scale() { rec fake-sci-scale "$@"; }
source "$1"
"""


def run_script(script: str, tmp_path: Path) -> list[list[str]]:
    """Run the batch script with Slurm and sci-scale shadowed; the calls it made, in order."""
    path, rec = tmp_path / "job.sbatch", tmp_path / "calls"
    path.write_text(script)
    env = {**os.environ, "REC": str(rec), "SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "node1"}
    proc = subprocess.run(
        ["bash", "-c", HARNESS, "harness", str(path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    calls = rec.read_text().split("\x1e")[:-1]
    return [call.split("\x1f")[:-1] for call in calls]


def base_config(tmp_path: Path) -> Config:
    overrides = small_overrides(tmp_path / "run", tmp_path / "cache")
    return load_config(None, [item for item in overrides if not item.startswith("run.dir=")])


def with_run(cfg: Config, **changes: str) -> Config:
    cfg.run = cfg.run.replace(**changes)
    return cfg


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    """A file that exists only if a rendered value was run as a command."""
    return tmp_path / "pwned"


def nothing_ran(tmp_path: Path) -> bool:
    """No marker file anywhere under ``tmp_path`` (hostile run directories may hold directories
    whose names start with the marker's: those are path components, not side effects)."""
    names = {"pwned", "pwned-name"}
    return not [path for path in tmp_path.rglob("*") if path.is_file() and path.name in names]


@pytest.mark.parametrize(
    "value",
    ["gpu", "a b", 'q"uote', "it's", "back\\slash", "hash#tag", "", "$(touch x)", "`x`;y", "%j"],
)
@pytest.mark.parametrize("single_quotes", [True, False])
def test_sbatch_quote_is_read_back_exactly_by_sbatch(value: str, single_quotes: bool) -> None:
    line = f"#SBATCH --comment={sbatch_quote(value)}"
    assert sbatch_tokens(line, single_quotes) == [f"--comment={value}"]


def test_plain_values_stay_bare_in_directives() -> None:
    assert sbatch_quote("gpu") == "gpu" and sbatch_quote(8) == "8"
    assert sbatch_quote("[h100|a100]&ib") == "[h100|a100]&ib"


@pytest.mark.parametrize("container", [False, True], ids=["bare", "container"])
def test_hostile_values_reach_bash_and_sbatch_exactly(
    tmp_path: Path, marker: Path, container: bool
) -> None:
    hostile = HOSTILE.format(m=marker)
    run_dir = tmp_path / f"runs {hostile}"  # '/' in the marker path only adds directories
    name = HOSTILE.format(m="pwned-name")  # a job name holds no '/'
    words = ["fake-sci-scale", "--flag=a b", hostile, "back\\slash", "", "-m"]
    image, mounts = f"img:tag {hostile}", f"/data:/data,{hostile}"
    opts = SubmitOptions(
        launcher=shlex.join(words),
        partition="gpu,debug",
        account="proj_1",
        qos="high",
        constraint="[h100|a100]&ib",
        time="1-00:00:00",
        mem="80G",
        extra_sbatch=['--comment="two words"', "--mail-type=END"],
        **({"container_image": image, "container_mounts": mounts} if container else {}),
    )
    cfg = with_run(base_config(tmp_path), dir=str(run_dir), name=name)
    config_path = run_dir / "config.yaml"
    script = render_script(cfg, config_path, opts)

    check = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr

    (run_dir / "slurm").mkdir(parents=True)
    calls = run_script(script, tmp_path)
    resolved = str(run_dir.resolve())
    in_image = [f"--container-image={image}", f"--container-mounts={mounts}"] if container else []
    assert calls[0] == ["scontrol", "show", "hostnames", "node1"]
    assert calls[1] == ["sinfo", "-h", "-N", "-n", "node1", "-o", "%o"]
    train, status = calls[2:]
    task_logs = f"{resolved}/slurm".replace("%", "%%") + "/%x-%j.r0"  # one pair per restart
    assert train == [
        "srun", "--kill-on-bad-exit=1", "--label", "--ntasks-per-node=8",
        f"--output={task_logs}.out", f"--error={task_logs}.err", *in_image,
        *words, "train", f"{resolved}/config.yaml", "--auto-resume",
    ]  # fmt: skip
    local = ["srun", "--nodes=1", "--ntasks=1", *in_image] if container else []
    assert status == [*local, *words, "status", resolved, "--finished"]
    assert nothing_ran(tmp_path)

    for single_quotes in (True, False):
        directives = sbatch_directives(script, single_quotes)
        assert option(directives, "--job-name") == f"sci-{name}"
        log_pattern = f"{resolved}/slurm".replace("%", "%%")
        assert option(directives, "--output") == f"{log_pattern}/%x-%j.out"
        assert option(directives, "--error") == f"{log_pattern}/%x-%j.err"
        for key in ("partition", "account", "qos", "constraint", "time", "mem"):
            assert option(directives, f"--{key}") == getattr(opts, key)
        assert option(directives, "--comment") == "two words"
        assert "--mail-type=END" in directives and "--exclusive" in directives


def test_an_explicit_job_name_is_quoted_for_sbatch(tmp_path: Path) -> None:
    opts = SubmitOptions(job_name="my job #3 'x'", gpus_per_node=0)
    script = render_script(base_config(tmp_path), tmp_path / "c.yaml", opts)
    assert option(sbatch_directives(script), "--job-name") == "my job #3 'x'"


def refusal(tmp_path: Path, field: str, value: Any) -> str:
    """The one-line message render_script refuses ``field=value`` with."""
    cfg, opts = base_config(tmp_path), SubmitOptions(gpus_per_node=0)
    if field.startswith("run."):
        cfg = with_run(cfg, **{field.removeprefix("run."): value})
    else:
        opts = dataclasses.replace(opts, **{field: value})
    with pytest.raises(ConfigError) as caught:
        render_script(cfg, tmp_path / "config.yaml", opts)
    message = str(caught.value)
    assert "\n" not in message and "\r" not in message, repr(message)
    return message


NEWLINE, RETURN = "a newline (U+000A)", "a carriage return (U+000D)"


@pytest.mark.parametrize(
    ("field", "value", "key", "named"),
    [
        ("run.name", "x\ntouch pwned", "run.name", NEWLINE),
        ("run.name", "x\ry", "run.name", RETURN),
        ("run.dir", "/tmp/a\nb", "run.dir", NEWLINE),
        ("job_name", "j\x00", "--job-name", "a NUL (U+0000)"),
        ("partition", "gpu\n#SBATCH --uid=0", "--partition", NEWLINE),
        ("account", "a\tb", "--account", "a tab (U+0009)"),
        ("qos", "q\x1b[0m", "--qos", "an escape (U+001B)"),
        ("constraint", "h100\u2028x", "--constraint", "a line separator (U+2028)"),
        ("time", "1:00\n", "--time", NEWLINE),
        ("mem", "80G\r", "--mem", RETURN),
        ("extra_sbatch", ["--comment=a\nrm -rf ~"], "--sbatch", NEWLINE),
        ("launcher", "python\n-m sci_scale", "--launcher", NEWLINE),
        ("container_image", "img\x7f", "--container-image", "a control character (U+007F)"),
        ("container_mounts", "/a\n/b", "--container-mounts", NEWLINE),
    ],
)
def test_a_control_character_is_refused_naming_the_key(
    tmp_path: Path, field: str, value: Any, key: str, named: str
) -> None:
    message = refusal(tmp_path, field, value)
    assert message.startswith(f"{key} ") and named in message


@pytest.mark.parametrize(
    ("field", "value", "key"),
    [
        ("time", "4h", "--time"),
        ("time", "1:2:3:4", "--time"),
        ("mem", "80GB", "--mem"),
        ("mem", "-1", "--mem"),
        ("partition", "gpu debug", "--partition"),
        ("partition", "gpu;reboot", "--partition"),
        ("account", "a,b", "--account"),
        ("qos", "$(id)", "--qos"),
        ("constraint", "h100 a100", "--constraint"),
        ("job_name", "a/b", "--job-name"),
        ("run.name", "exp/1", "run.name"),
        ("run.name", "", "run.name"),
        ("run.dir", "/tmp/back\\slash", "run.dir"),
        ("extra_sbatch", ["mail-type=END"], "--sbatch"),
        ("launcher", "'unclosed", "--launcher"),
        ("launcher", "  ", "--launcher"),
        ("signal_seconds", -1, "--signal-seconds"),
        ("max_requeues", True, "--max-requeues"),
        ("cpus_per_task", 0, "--cpus-per-task"),
        ("cpus_per_task", "8; id", "--cpus-per-task"),
    ],
)
def test_a_value_sbatch_would_misread_is_refused_naming_the_key(
    tmp_path: Path, field: str, value: Any, key: str
) -> None:
    assert refusal(tmp_path, field, value).startswith(key)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("time", "90"),
        ("time", "30:00"),
        ("time", "1-12"),
        ("time", "2-00:00:00"),
        ("time", "UNLIMITED"),
        ("mem", "0"),
        ("mem", "512M"),
        ("mem", "80g"),
        ("partition", "gpu,debug"),
        ("qos", "normal"),
        ("account", "proj-1.x"),
        ("constraint", "[h100*2|a100*4]&ib"),
        ("job_name", "train-7b"),
    ],
)
def test_a_value_sbatch_accepts_renders_as_given(tmp_path: Path, field: str, value: str) -> None:
    opts = SubmitOptions(gpus_per_node=0, **{field: value})
    script = render_script(base_config(tmp_path), tmp_path / "config.yaml", opts)
    directive = "--job-name" if field == "job_name" else f"--{field}"
    assert f"#SBATCH {directive}={value}\n" in script


def test_the_launcher_is_split_like_a_shell_and_never_expanded() -> None:
    opts = SubmitOptions(launcher="/opt/venv/bin/python -m sci_scale '$HOME x'")
    assert launcher_words(opts) == ["/opt/venv/bin/python", "-m", "sci_scale", "$HOME x"]
    assert launcher_words(SubmitOptions(container_image="img"))[0] == "python"
    assert launcher_words(SubmitOptions()) == [sys.executable, "-m", "sci_scale"]


def sci_scale(*args: str, cwd: Path, path_dir: Path | None = None) -> subprocess.CompletedProcess:
    return sci_scale_cli(*args, cwd=cwd, path_dir=path_dir)


def write_config(directory: Path, run: dict[str, str]) -> Path:
    directory.mkdir(parents=True)
    path = directory / "my config.yaml"
    path.write_text(yaml.safe_dump({"run": run}))
    return path


def cli_overrides(tmp_path: Path) -> list[str]:
    overrides = small_overrides(tmp_path / "unused", tmp_path / "cache")
    return [item for item in overrides if not item.startswith("run.dir=")]


def test_cli_dry_run_with_hostile_paths_renders_their_exact_values(
    tmp_path: Path, marker: Path
) -> None:
    run_dir = tmp_path / f"run {HOSTILE.format(m=marker)}"
    config = write_config(tmp_path / "configs $USER", {"dir": str(run_dir), "name": "x; y"})
    proc = sci_scale(
        "submit", str(config), *cli_overrides(tmp_path), "--gpus-per-node", "0", "--dry-run",
        cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assignments = [line for line in script.splitlines() if line.startswith(("RUN_DIR=", "CONFIG="))]
    echo = "\n".join([*assignments, 'printf "%s\\x1f" "$RUN_DIR" "$CONFIG"'])
    out = subprocess.run(["bash", "-c", echo], cwd=tmp_path, capture_output=True, text=True)
    got_run_dir, got_config = out.stdout.split("\x1f")[:2]
    assert got_run_dir == str(run_dir)
    assert got_config.startswith(f"{run_dir}/slurm/train-") and got_config.endswith(".yaml")
    assert nothing_ran(tmp_path)


@pytest.mark.parametrize(
    ("run_name", "options", "expected"),
    [
        ("evil\ntouch pwned", [], "run.name 'evil\\ntouch pwned' contains a newline (U+000A)"),
        ("ok", ["--partition", "gpu\r\n#SBATCH --uid=0"], "--partition 'gpu\\r\\n#SBATCH"),
    ],
    ids=["run-name", "partition"],
)
def test_cli_refuses_a_line_break_with_one_line_and_status_2(
    tmp_path: Path, recording_sbatch, run_name: str, options: list[str], expected: str
) -> None:
    bin_dir, calls = recording_sbatch
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "configs", {"dir": str(run_dir), "name": run_name})
    proc = sci_scale(
        "submit", str(config), *cli_overrides(tmp_path), "--gpus-per-node", "0", *options,
        cwd=tmp_path, path_dir=bin_dir,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("sci-scale submit: error: ") and expected in proc.stderr
    assert not calls.exists() and not run_dir.exists()  # nothing queued, nothing written
    assert nothing_ran(tmp_path)
