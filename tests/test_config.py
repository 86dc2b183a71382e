"""experiments/config.py: the RunConfig, its flags (declared once), their checks, the paper grid."""

import argparse
import dataclasses

import pytest

from experiments import cifar
from experiments import config as config_lib
from experiments import paper


@pytest.mark.parametrize("flags, valid", [
    (["--mode", "prox_cg0"], "prox_cgN (N >= 1)"),
    (["--mode", "exact"], "backprop, gradient, prox_exact"),
    (["--tau-prox", "0"], "> 0"),
    (["--tau-prox", "nan"], "> 0"),
    (["--model", "vgg"], "'convnet', 'mlp', 'resnet', 'vit'"),
    (["--optimizer", "sgd"], "'adam', 'adamw', 'nesterov'"),
    (["--dataset", "mnist"], "'cifar10', 'digits'"),
    (["--parallel", "gpu"], "'auto', 'none', 'pmap', 'sharded'"),
    (["--epochs", "0"], "must be an integer > 0"),
    (["--batch-size", "-5"], "must be an integer > 0"),
    (["--lr", "-1"], "must be a number > 0"),
    (["--keep-checkpoints", "0"], "must be an integer > 0"),
])
def test_bad_flags_fail_at_once_naming_valid_values(flags, valid, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cifar.make_parser().parse_args(flags)
  assert exit_info.value.code == 2
  assert valid in capsys.readouterr().err


def test_defaults_are_the_reference_settings():
  args = cifar.make_parser().parse_args([])
  assert (args.model, args.mode, args.optimizer, args.lr, args.tau_prox, args.momentum,
          args.epochs, args.batch_size, args.dataset, args.parallel) == (
              "convnet", "prox_cg1", "adam", 1e-3, 1.0, 0.95, 50, 500, "cifar10", "auto")
  config, _ = config_lib.parse(cifar.make_parser(), [])
  assert config == config_lib.RunConfig()
  assert (config.weight_decay, config.keep_checkpoints) == (1e-4, 2)


def test_every_field_is_a_flag_with_its_meaning_and_default_in_help(capsys):
  with pytest.raises(SystemExit):
    cifar.make_parser().parse_args(["--help"])
  text = " ".join(capsys.readouterr().out.split())
  for field in dataclasses.fields(config_lib.RunConfig):
    assert f"--{field.name.replace('_', '-')}" in text
    assert " ".join(field.metadata["help"].split()) in text


def test_flags_parse_into_a_frozen_config():
  config, _ = config_lib.parse(cifar.make_parser(), [
      "--model", "mlp", "--mode", "prox_cg3", "--optimizer", "adamw", "--lr", "0.01",
      "--tau-prox", "0.05", "--weight-decay", "0.001", "--epochs", "3", "--keep-checkpoints",
      "1", "--resume", "--dataset", "digits", "--train-samples", "100"])
  assert config == config_lib.RunConfig(
      model="mlp", mode="prox_cg3", optimizer="adamw", lr=0.01, tau_prox=0.05,
      weight_decay=0.001, epochs=3, keep_checkpoints=1, resume=True, dataset="digits",
      train_samples=100)
  with pytest.raises(dataclasses.FrozenInstanceError):
    config.lr = 1.0


def test_paper_and_cifar_declare_the_shared_flags_from_one_place():
  parsers = (cifar.make_parser(), paper.make_parser())
  for parser in parsers:
    args = vars(parser.parse_args(["--out", "x"]))
    text = " ".join(parser.format_help().split())
    for name in paper.SHARED_FLAGS:
      field = config_lib.FIELDS[name]
      assert args[name] == field.default
      assert " ".join(field.metadata["help"].split()) in text
  # Settings the grid fixes per run are not flags of the grid.
  grid = vars(parsers[1].parse_args(["--out", "x"]))
  assert not {"model", "mode", "optimizer", "lr", "tau_prox", "momentum"} & set(grid)


def test_data_dir_that_does_not_exist_is_an_error_naming_it(tmp_path, capsys):
  missing = tmp_path / "no_such_folder"
  for parser in (cifar.make_parser(), paper.make_parser()):
    with pytest.raises(SystemExit) as exit_info:
      config_lib.parse(parser, ["--out", str(tmp_path / "o"), "--data-dir", str(missing)])
    assert exit_info.value.code == 2
    assert f"--data-dir {missing} does not exist" in capsys.readouterr().err


def test_data_dir_with_digits_is_an_error(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    config_lib.parse(cifar.make_parser(), ["--dataset", "digits", "--data-dir", str(tmp_path)])
  assert exit_info.value.code == 2
  assert "--data-dir is for --dataset cifar10 only" in capsys.readouterr().err


def test_data_dir_is_expanded(tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path))
  (tmp_path / "prepared").mkdir()
  config = config_lib.from_args(argparse.Namespace(data_dir="~/prepared", dataset="cifar10"))
  assert config.data_dir == str(tmp_path / "prepared")


def test_resume_keys_are_settings_and_leave_out_what_may_change():
  assert set(config_lib.RESUME_KEYS) <= set(config_lib.FIELDS)
  for may_change in ("epochs", "out", "resume", "quiet", "parallel", "keep_checkpoints",
                     "data_dir"):
    assert may_change not in config_lib.RESUME_KEYS


def test_paper_grid_and_settings_per_model_and_mode():
  names = [r.name for r in config_lib.PAPER_GRID]
  assert len(names) == len(set(names)) == 8
  assert config_lib.paper_settings("mlp", "backprop") == ("nesterov", 0.05, 1.0)
  assert config_lib.paper_settings("mlp", "prox_exact") == ("nesterov", 1.0, 0.05)
  assert config_lib.paper_settings("mlp", "gradient") == ("nesterov", 1.0, 0.05)
  assert config_lib.paper_settings("convnet", "prox_cg1") == ("adam", 1e-3, 1.0)
  with pytest.raises(ValueError, match="valid: mlp, convnet"):
    config_lib.paper_settings("resnet", "backprop")
