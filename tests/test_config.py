"""nanoalign.utils.configure: --key=value and config-file overrides of a script's config block."""
import pytest

from nanoalign.utils import ConfigError, configure

SCRIPT = '''"""A script."""
# ---- config
out_dir = "out/x"  # where things go
steps = 10  # how many
lr = 0.1  # learning rate
flag = False  # a switch
ns = "1,2,4"  # a list as text
# ---- end config
'''


@pytest.fixture
def g(tmp_path):
    path = tmp_path / "script.py"
    path.write_text(SCRIPT)
    g = {"__file__": str(path), "__doc__": "A script."}
    exec(SCRIPT.split("# ---- config", 1)[1], g)
    return g


def test_overrides_parse_literals_and_keep_types(g):
    config = configure(g, ["--steps=3", "--lr=1", "--flag=True", "--out_dir=out/y", "--ns=1,8"])
    assert config == {"out_dir": "out/y", "steps": 3, "lr": 1.0, "flag": True, "ns": "1,8"}
    assert type(g["lr"]) is float and g["steps"] == 3


def test_config_file_is_parsed_not_executed(g, tmp_path):
    cfg = tmp_path / "cfg.py"
    cfg.write_text("steps = 7\nlr = 0.5\n")
    assert configure(g, [str(cfg), "--steps=8"])["steps"] == 8  # later arguments win
    assert g["lr"] == 0.5
    evil = tmp_path / "evil.py"
    evil.write_text("import os\n")
    with pytest.raises(ConfigError, match="only `key = literal`"):
        configure(g, [str(evil)])


def test_errors_name_the_problem(g):
    with pytest.raises(ConfigError, match="unknown config key 'stepz'"):
        configure(g, ["--stepz=1"])
    with pytest.raises(ConfigError, match="steps must be int"):
        configure(g, ["--steps=1.5"])
    with pytest.raises(ConfigError, match="expected --key=value"):
        configure(g, ["--steps"])


def test_help_lists_keys_defaults_and_descriptions(g, capsys):
    with pytest.raises(SystemExit) as e:
        configure(g, ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--steps=10" in out and "how many" in out and "--ns='1,2,4'" in out and "a list as text" in out
