"""Config completeness: every field the code reads is declared (with a comment) in configs/default.py, and
every override that an error message, a config's docstring or the README suggests parses and validates."""

import ast
import os
import re
import shlex

import pytest
from absl import flags
from ml_collections import ConfigDict, config_flags

from configs import default
from tests.helpers import REPO

pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # config_flags loading files

SOURCES = sorted((REPO / "kure_jax").rglob("*.py")) + [REPO / "train.py", REPO / "eval.py"]
METHODS = {n for n in dir(ConfigDict) if not n.startswith("_")}  # config.get(...), config.to_json_best_effort(), ...
GETTERS = {"_get", "getattr"}  # _get(config, "key") (the data pipeline), getattr(config, "key")
SECTIONS = ("dataset", "model_kwargs", "optimizer", "schedule", "kure", "reg", "quant", "eval", "train_sweep")


# ----------------------------------------------------------------------------------
# What the code reads: an AST walk.
#
# A "config expression" is FLAGS.config, a parameter `config: ml_collections.ConfigDict`, a name
# assigned from a config expression (k = config.kure; reg = config.get("reg")), or a parameter of a
# function that some call passes a config expression (make_dataset(config.dataset, ...) makes
# make_dataset's `config` the dataset config, and so on through _get(config, "preprocess")).
# Reads are attribute, subscript, .get("x") and _get/getattr(c, "x") on config expressions.


DEFAULT = default.get_config()


def declared(config, path):
  node = config
  for part in path:
    if not isinstance(node, ConfigDict) or part not in node:
      return False
    node = node[part]
  return True


def _section(path):
  """Whether `path` is the root or a sub-config: only those have fields (config.init_from.startswith is a str method)."""
  if not declared(DEFAULT, path):
    return False
  node = DEFAULT
  for part in path:
    node = node[part]
  return isinstance(node, ConfigDict)


def _walk(unit):
  """The nodes of a function (with its closures), or of a module's top level only."""
  todo = list(ast.iter_child_nodes(unit))
  while todo:
    node = todo.pop()
    yield node
    if isinstance(unit, ast.Module) and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      continue
    todo.extend(ast.iter_child_nodes(node))


def _units():
  out = []
  for path in SOURCES:
    tree = ast.parse(path.read_text(), str(path))
    out.append((path, tree))
    out += [(path, node) for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
  return out


def _params(fn):
  if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
    return []
  a = fn.args
  return a.posonlyargs + a.args + a.kwonlyargs


def _loop_keys(unit):
  """{id(subscript): [str, ...]} for `x[name]` inside `for name in ("a", "b"):`."""
  out = {}
  for loop in _walk(unit):
    if not (isinstance(loop, ast.For) and isinstance(loop.target, ast.Name) and isinstance(loop.iter, (ast.Tuple, ast.List))):
      continue
    values = [e.value for e in loop.iter.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
    if len(values) != len(loop.iter.elts):
      continue
    for stmt in loop.body:
      for n in ast.walk(stmt):
        if isinstance(n, ast.Subscript) and isinstance(n.slice, ast.Name) and n.slice.id == loop.target.id:
          out[id(n)] = values
  return out


def _resolve(node, env, keys):
  """The config paths (tuples of field names) an expression denotes; empty if it is not a config expression."""
  def extend(base, key):
    return {p + (key,) for p in base if _section(p)}

  if isinstance(node, ast.Name):
    return set(env.get(node.id, ()))
  if isinstance(node, ast.Attribute):
    if isinstance(node.value, ast.Name) and node.value.id == "FLAGS" and node.attr == "config":
      return {()}
    return set() if node.attr in METHODS else extend(_resolve(node.value, env, keys), node.attr)
  if isinstance(node, ast.Subscript):
    base = _resolve(node.value, env, keys)
    if isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
      return extend(base, node.slice.value)
    return {q for k in keys.get(id(node), ()) for q in extend(base, k)}
  if isinstance(node, ast.Call) and node.args:
    func = node.func
    if isinstance(func, ast.Attribute) and func.attr == "get":
      key, base = node.args[0], _resolve(func.value, env, keys)
    elif isinstance(func, ast.Name) and func.id in GETTERS and len(node.args) >= 2:
      key, base = node.args[1], _resolve(node.args[0], env, keys)
    else:
      return set()
    if isinstance(key, ast.Constant) and isinstance(key.value, str) and key.value not in METHODS:
      return extend(base, key.value)  # (not getattr(config, "get"))
  return set()


def _arguments(call, callee):
  """(parameter, argument) pairs of a call; a method called as obj.f(...) does not get `self`."""
  params = _params(callee)
  if params and params[0].arg in ("self", "cls") and isinstance(call.func, ast.Attribute):
    params = params[1:]
  return list(zip(params, call.args)) + [(a, k.value) for k in call.keywords for a in params if a.arg == k.arg]


def config_reads():
  """{path: ["file:line", ...]} of every config field read in kure_jax/, train.py and eval.py."""
  units = _units()
  by_name = {}
  for _, fn in units:
    if not isinstance(fn, ast.Module):
      by_name.setdefault(fn.name, []).append(fn)
  bound = {}  # (id(function), parameter) -> config paths it receives
  for _, fn in units:
    for a in _params(fn):
      if a.arg == "config" and a.annotation is not None and "ConfigDict" in ast.unparse(a.annotation):
        bound[(id(fn), a.arg)] = {()}
  reads = {}
  for _ in range(10):  # to a fixpoint: sub-configs flow through calls
    changed = False
    for path, unit in units:
      keys = _loop_keys(unit)
      env = {a.arg: set(bound[(id(unit), a.arg)]) for a in _params(unit) if (id(unit), a.arg) in bound}
      assigns = [n for n in _walk(unit) if isinstance(n, ast.Assign) and len(n.targets) == 1
                 and isinstance(n.targets[0], ast.Name)]
      for _ in range(3):  # k = config.kure; then names assigned from k ...
        for n in assigns:
          sections = {p for p in _resolve(n.value, env, keys) if _section(p)}
          if sections:
            env[n.targets[0].id] = env.get(n.targets[0].id, set()) | sections
      for node in _walk(unit):
        if isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
          for p in _resolve(node, env, keys):
            reads.setdefault(p, set()).add(f"{path.relative_to(REPO)}:{node.lineno}")
        if not isinstance(node, ast.Call):
          continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
        for callee in by_name.get(name, []):
          for param, arg in _arguments(node, callee):
            sections = {p for p in _resolve(arg, env, keys) if _section(p)}
            key = (id(callee), param.arg)
            if sections and not sections <= bound.get(key, set()):
              bound[key] = bound.get(key, set()) | sections
              changed = True
    if not changed:
      break
  return {p: sorted(w) for p, w in reads.items()}


def test_the_walk_finds_reads_under_other_names():
  reads = config_reads()
  for path in [("kure", "weight"), ("kure", "include"), ("kure", "exclude"),  # k = config.kure; k[field] in a loop
               ("reg", "grad_l1_weight"),                                      # reg = config.get("reg")
               ("dataset", "preprocess"), ("dataset", "mean"), ("dataset", "cache"),  # _get(config, ...) in the pipeline
               ("eval", "lapq_max_evals"), ("quant", "w_bits"), ("dtype",), ("resume_step",), ("log_every_steps",)]:
    assert path in reads, path


def test_every_field_the_code_reads_is_declared():
  missing = {".".join(p): where for p, where in config_reads().items() if not declared(DEFAULT, p)}
  assert not missing, f"read but not declared in configs/default.py: {missing}"


def test_every_field_has_a_comment():
  lines = (REPO / "configs" / "default.py").read_text().splitlines()
  bare = [line.strip() for line in lines if re.match(r"\s*c\.[\w.]+\s*=", line) and "ConfigDict()" not in line
          and "#" not in line]
  assert not bare, f"fields without a comment in configs/default.py: {bare}"


# ----------------------------------------------------------------------------------
# What the messages, the configs' docstrings and the README suggest.

OVERRIDE = re.compile(r"--config\.([a-z_][a-z0-9_.]*)=('[^']*'|\"[^\"]*\"|[^\s`'\"),;]+)?")
SET_FIELD = re.compile(r"(?<![\w.-])((?:%s)\.[a-z_]+)=('[^']*')" % "|".join(SECTIONS))
MENTION = re.compile(r"(?<![\w/.-])(?:--)?config\.((?:%s)\.[a-z_]+)(?![\w(.])"  # config.kure.weight
                     r"|(?<![\w/.-])(dataset\.[a-z_]+)(?![\w(.])" % "|".join(SECTIONS))  # the pipeline's dataset.x
CONFIG_FILE = re.compile(r"--config[ =](configs/\w+\.py)")
PLACEHOLDER = "\x00"  # an f-string's formatted value


def _strings():
  """(where, text) of every string constant in the sources (f-strings with their values as PLACEHOLDER)."""
  for path in SOURCES:
    tree = ast.parse(path.read_text(), str(path))
    inner = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
    for node in ast.walk(tree):
      if isinstance(node, ast.JoinedStr):
        text = "".join(v.value if isinstance(v, ast.Constant) else PLACEHOLDER for v in node.values)
      elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in inner:
        text = node.value
      else:
        continue
      yield f"{path.relative_to(REPO)}:{node.lineno}", text


def _unquote(value):
  """What the shell passes for a quoted value ('("a","b")' → ("a","b"))."""
  return shlex.split(value)[0] if value[:1] in ("'", '"') else value


def _commands(text):
  """Lines of `text` with backslash continuations joined."""
  return re.sub(r"\\\n\s*", " ", text).splitlines()


def suggested_overrides():
  """[(where, config file, [--config.x=v, ...], whole command?)]: one entry per command or message.

  A command (the README, a config's docstring) must also validate as a whole; a message's
  suggestion is a fix in its own context (e.g. a DoReFa checkpoint), so it must parse.
  """
  out = []
  docs = [("README.md", (REPO / "README.md").read_text())]
  docs += [(f"configs/{p.name}", ast.get_docstring(ast.parse(p.read_text())) or "")
           for p in sorted((REPO / "configs").glob("*.py"))]
  for where, text in docs:
    for line in _commands(text):
      found = [f"--config.{f}={_unquote(v)}" for f, v in OVERRIDE.findall(line) if v and f != "x"]
      if found:
        cfg = CONFIG_FILE.search(line)
        out.append((where, cfg.group(1) if cfg else "configs/cifar10_resnet20.py", found, True))
  for where, text in _strings():
    found = [f"--config.{f}={_unquote(v)}" for f, v in OVERRIDE.findall(text)
             if v and f != "x" and PLACEHOLDER not in f + v]  # not train.py's "[--config.x=y ...]"
    found += [f"--config.{f}={v[1:-1]}" for f, v in SET_FIELD.findall(text)]
    if found:
      out.append((where, "configs/cifar10_resnet20.py", found, False))
  return out


def parse(config_file, overrides):
  """What train.py/eval.py do with `--config FILE --config.x=v ...`: the config, or the parser's exception."""
  argv = ["prog", f"--config={config_file}", *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
  values(argv)
  return values.config


def test_the_suggestions_are_found():
  found = {o for _, _, overrides, _ in suggested_overrides() for o in overrides}
  for o in ["--config.dataset.preprocess=imagenet",           # the pipeline's "set dataset.preprocess='imagenet'"
            "--config.dataset.name=folder",                    # the sources' "set dataset.name='folder'"
            "--config.kure.weight=0",                          # validate_config's grad_l1 message
            "--config.eval.targets=(\"weights\",\"both\")",    # the README, quoted for the shell
            "--config.init_from=runs/r20"]:                    # configs/cifar10_resnet20.py's docstring
    assert o in found, o


@pytest.mark.parametrize("where, config_file, overrides, command", suggested_overrides(),
                         ids=lambda x: str(x)[:60])
def test_suggested_override_works(monkeypatch, where, config_file, overrides, command):
  from kure_jax.evaluation.evaluate import grid_from_config
  from kure_jax.training.train import validate_config

  monkeypatch.chdir(REPO)
  config = parse(config_file, overrides)  # an undeclared field or a value of the wrong type raises here
  if command:
    validate_config(config)
    grid_from_config(config)


def test_fields_named_in_messages_are_declared():
  config = default.get_config()
  missing = [(where, a or b) for where, text in _strings() for a, b in MENTION.findall(text)
             if not declared(config, tuple((a or b).split(".")))]
  assert not missing, missing


def test_the_pipelines_own_suggestion_works_end_to_end(tmp_path):
  """'set dataset.preprocess=...', dataset.mean/std: the overrides reach the data pipeline."""
  import numpy as np

  from kure_jax import data
  from kure_jax.data import transforms
  from tests.helpers import write_class_folders

  root = write_class_folders(tmp_path / "d", per_class={"train": 4, "test": 2})
  base = ["--config.dataset.name=folder", f"--config.dataset.data_dir={root}", "--config.dataset.num_classes=2",
          "--config.dataset.cache=False", "--config.dataset.preprocess=imagenet"]
  plain = parse("configs/cifar10_resnet20.py", base)
  custom = parse("configs/cifar10_resnet20.py", base + ["--config.dataset.mean=(0.5,0.5,0.5)",
                                                        "--config.dataset.std=(0.25,0.25,0.25)"])
  a, b = (data.make_dataset(c.dataset, "eval", batch_size=4, train=False) for c in (plain, custom))
  assert a.preprocess == b.preprocess == "imagenet"  # not 'cifar', the default for 32-px folders
  x = a.get_batch(0)["image"] * np.array(transforms.IMAGENET_STD) + np.array(transforms.IMAGENET_MEAN)
  np.testing.assert_allclose(b.get_batch(0)["image"] * 0.25 + 0.5, x, atol=1e-5)


def test_the_study_evaluations_parse_and_validate(monkeypatch):
  """Every eval.py call of scripts/study_eval.sh (printed by DRY=1) parses and validates, before a study spends
  hours training for them."""
  import subprocess

  from kure_jax import qat
  from kure_jax.evaluation.evaluate import grid_from_config
  from kure_jax.training.train import validate_config

  monkeypatch.chdir(REPO)
  r = subprocess.run(["bash", "scripts/study_eval.sh", "data", "runs/x"], capture_output=True, text=True,
                     env={"DRY": "1", "PATH": "/usr/bin:/bin", "PUBLISHED": ""},
                     check=True)  # PUBLISHED="": list every evaluation, reported or not
  commands = [shlex.split(line) for line in r.stdout.splitlines()]
  assert len(commands) == 16  # 5 evaluations × 2 presets, 1 of number formats, 5 of QAT checkpoints
  presets = set()
  for argv in commands:
    assert argv[:2] == ["python", "eval.py"] and argv[argv.index("--out") + 1].startswith("runs/x/eval_")
    # LAPQ's searches are kept beside the committed report, not in OUT (which a new machine may lack)
    assert "--config.eval.lapq_cache=docs/results/cifar10_study_lapq" in argv
    overrides = [a for a in argv if a.startswith("--config.")]
    config = parse(argv[argv.index("--config") + 1], overrides)
    validate_config(config)
    qat.validate(config)
    grid_from_config(config)
    presets.add(config.eval.preset)
  assert presets == {"ours", "authors"}


def test_the_study_scripts_continue_from_shipped_weights(tmp_path):
  """A clone without the study's runs: study_train.sh skips the shipped models and fine-tunes from the shipped base;
  study_eval.sh reads a model from OUT where its training is done there, else from its shipped weights."""
  import subprocess

  stub = tmp_path / "bin"
  stub.mkdir()
  calls = tmp_path / "calls"
  # python stub: records its arguments; as train.py, leaves a finished run's log line; as eval.py, its --out folder
  (stub / "python").write_text(f'#!/bin/bash\necho "$@" >> {calls}\necho "{{\'interrupted\': False}}"\n'
                               'while [[ $# -gt 0 ]]; do [[ $1 == --out ]] && mkdir -p "$2"; shift; done\n')
  (stub / "python").chmod(0o755)
  shipped = tmp_path / "weights"
  for name in ("study_base", "study_baseline_s0", "study_kure_t3"):
    (shipped / name).mkdir(parents=True)
    (shipped / name / "variables.msgpack").write_bytes(b"x")
  (shipped / "study_kure_s0").mkdir()  # no variables: not shipped
  out = tmp_path / "out"
  env = {"PATH": f"{stub}:/usr/bin:/bin", "SHIPPED": f"{shipped}/study_", "PUBLISHED": ""}  # no committed rows
  subprocess.run(["bash", "scripts/study_train.sh", "data", str(out)], env=env, check=True, cwd=REPO,
                 capture_output=True)
  runs = [line.split("--workdir ")[1].split()[0].rsplit("/", 1)[1] for line in calls.read_text().splitlines()]
  assert runs[:3] == ["kure_s0", "kure_t4", "kure_t2.4"] and len(runs) == 13  # 16 but base, baseline_s0, kure_t3
  assert all(f"--config.init_from={shipped}/study_base " in line for line in calls.read_text().splitlines())

  calls.unlink()
  os.makedirs(out / "kure_t3", exist_ok=True)
  open(out / "kure_t3" / "done", "w").close()  # trained here too: OUT wins
  subprocess.run(["bash", "scripts/study_eval.sh", "data", str(out)], env={**env, "ONLY": "formats"}, check=True,
                 cwd=REPO, capture_output=True)
  argv = shlex.split(calls.read_text())
  pairs = [(argv[i + 1], argv[i + 3]) for i, a in enumerate(argv) if a == "--checkpoint"]
  # the stub trained nothing to the end (no done markers): the shipped models and OUT's finished kure_t3 only
  assert pairs == [(f"{shipped}/study_base", "base"), (f"{shipped}/study_baseline_s0", "baseline_s0"),
                   (str(out / "kure_t3"), "kure_t3")]
  assert argv[argv.index("--out") + 1] == str(out / "eval_formats" / "1")
  assert (out / "eval_formats" / "1" / "scored").read_text().split() == ["base", "baseline_s0", "kure_t3"]

  # a model finished since: the next run scores it alone, into the next part; then nothing is left to score
  calls.unlink()
  os.makedirs(out / "kure_s0", exist_ok=True)
  open(out / "kure_s0" / "done", "w").close()
  # a long part after the one naming base: a reader that stops at the first match must not rescore base (a `cat |
  # grep -q` pipeline under pipefail did, when cat got SIGPIPE)
  os.makedirs(out / "eval_formats" / "9")
  (out / "eval_formats" / "9" / "scored").write_text("".join(f"other_{i}\n" for i in range(200_000)))
  for _ in range(2):
    subprocess.run(["bash", "scripts/study_eval.sh", "data", str(out)], env={**env, "ONLY": "formats"}, check=True,
                   cwd=REPO, capture_output=True)
  argv = shlex.split(calls.read_text())
  assert argv.count("--checkpoint") == 1 and argv[argv.index("--checkpoint") + 1] == str(out / "kure_s0")
  assert argv[argv.index("--out") + 1] == str(out / "eval_formats" / "2")
  assert (out / "eval_formats" / "2" / "scored").read_text().split() == ["kure_s0"]


def test_the_weight_grid_is_set_from_the_command_line():
  """--config.model_kwargs.weight_grid reaches the model (QAT, train_sweep); unset, the model keeps its default;
  a grid no model takes, or a keyword the model has not, is one line."""
  from kure_jax import models
  from kure_jax.errors import UserError
  from kure_jax.training.train import validate_config

  config = parse("configs/cifar10_resnet20.py", ["--config.model_kwargs.weight_grid=midrise"])
  validate_config(config)
  assert models.model_kwargs(config) == {"weight_grid": "midrise"}
  assert models.get_model("resnet20", 10, **models.model_kwargs(config)).weight_grid == "midrise"
  unset = parse("configs/cifar10_resnet20.py", [])
  assert models.model_kwargs(unset) == {} and models.weight_grid(models.model_kwargs(unset)) == "signed"
  ncf = parse("configs/movielens_neumf.py", ["--config.model_kwargs.quantize_embeddings=True"])
  validate_config(ncf)
  assert models.model_kwargs(ncf)["quantize_embeddings"] is True
  with pytest.raises(UserError, match=r"^config.model_kwargs.weight_grid is 'sliding'; choose one of signed"):
    validate_config(parse("configs/cifar10_resnet20.py", ["--config.model_kwargs.weight_grid=sliding"]))
  wrong = parse("configs/cifar10_resnet20.py", [])
  with wrong.unlocked():
    wrong.model_kwargs.factors = 8  # NeuMF's, not ResNet-20's
  with pytest.raises(UserError, match=r"^config.model_kwargs.factors is no argument of resnet20; it takes .*weight_grid"):
    validate_config(wrong)


@pytest.mark.parametrize("config_file", sorted(p.name for p in (REPO / "configs").glob("*.py") if p.name != "default.py"))
def test_every_configs_model_kwargs_are_its_models_arguments(config_file):
  from kure_jax.training.train import validate_config

  validate_config(parse(f"configs/{config_file}", []))  # model_kwargs.x that the model lacks → UserError
