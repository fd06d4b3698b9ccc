"""Registry plugins: modules named in KEEPBITS_PLUGINS or load_plugins, entry points of
installed packages, module:factory specs; re-registering the same builder is fine, a different
builder under a taken name is not. Plugin modules are written to tmp_path."""
import logging
import importlib
import sys
import textwrap

import pytest

from keepbits import registry
from keepbits.errors import InputError

PLUGIN = '''
from keepbits.registry import register

@register("{name}", "classifier")
def build(num_classes=3, **kwargs):
    """A third-party classifier."""
    return ("model", num_classes)

def factory(num_classes=5):
    return ("factory", num_classes)

NOT_CALLABLE = 42
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """Write plugin module ``kb_plugin_<test>`` registering ``plugin_<test>``; isolate the registry."""
    registry.names()  # built-in providers registered first, into the real table
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))
    monkeypatch.syspath_prepend(str(tmp_path))
    created = []

    def write(module: str, name: str, source: str = PLUGIN) -> str:
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(source.format(name=name)))
        importlib.invalidate_caches()
        created.append(module)
        return module

    yield write
    for module in created:
        sys.modules.pop(module, None)


def test_env_variable_plugin_is_loaded_before_listing(plugin, monkeypatch):
    plugin("kb_env_plugin", "env_model")
    monkeypatch.setenv(registry.PLUGIN_ENV, " kb_env_plugin , ")
    assert "env_model" in registry.names("classifier")
    assert registry.build("env_model", num_classes=7) == ("model", 7)


def test_load_plugins_and_reimport_is_not_an_error(plugin):
    plugin("kb_plugin_a", "model_a")
    registry.load_plugins(["kb_plugin_a"])
    first = registry.spec("model_a").builder
    importlib.reload(sys.modules["kb_plugin_a"])  # the same builder defined again
    assert registry.spec("model_a").builder is not first and registry.build("model_a") == ("model", 3)


def test_a_different_builder_under_a_taken_name_is_an_error(plugin):
    plugin("kb_plugin_b", "lenet5")
    with pytest.raises(InputError, match=r"plugin: cannot import 'kb_plugin_b' \(ValueError: model name 'lenet5' is already registered by "
                                         r"keepbits.training.models.classifiers.lenet5\)"):
        registry.load_plugins(["kb_plugin_b"])


@pytest.mark.parametrize("module, match", [
    ("kb_no_such_plugin", r"cannot import 'kb_no_such_plugin' \(ModuleNotFoundError"),
    ("not a module", "is not a module name"),
])
def test_unimportable_plugin_is_one_clear_line(module, match):
    with pytest.raises(InputError, match=match) as info:
        registry.load_plugins([module])
    assert "\n" not in str(info.value)


def test_entry_point_plugins_of_installed_packages(plugin, tmp_path, monkeypatch, caplog):
    plugin("kb_ep_plugin", "entry_point_model")
    dist = tmp_path / "kb_ep_dist-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kb-ep-dist\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{registry.PLUGIN_GROUP}]\nmine = kb_ep_plugin\nbroken = kb_ep_missing_module\n")
    importlib.invalidate_caches()
    monkeypatch.setattr(registry, "_loaded", False)
    with caplog.at_level(logging.WARNING, logger="keepbits"):  # a broken installed plugin does not stop keepbits
        names = registry.names("classifier")
    assert "plugin 'broken' (kb_ep_missing_module) failed to load: ModuleNotFoundError" in caplog.text
    assert "entry_point_model" in names and "lenet5" in names


def test_resolve_names_and_module_factories(plugin):
    plugin("kb_factories", "factory_model")
    assert registry.resolve("lenet5") is registry.spec("lenet5").builder
    assert registry.resolve("kb_factories:factory")(num_classes=2) == ("factory", 2)
    assert registry.resolve("kb_factories:build.__call__")() == ("model", 3)  # a dotted attribute path


@pytest.mark.parametrize("spec, match", [
    ("kb_absent_module:factory", r"model factory 'kb_absent_module:factory': cannot import 'kb_absent_module'"),
    ("kb_factories:missing", r"'kb_factories' has no attribute 'missing'"),
    ("kb_factories:NOT_CALLABLE", "is a int, not a callable"),
    (":factory", "'' is not a module name"),
    ("no_such_registered_model", r"unknown model 'no_such_registered_model'.*KEEPBITS_PLUGINS.*'keepbits.models' entry point"),
])
def test_resolve_errors_are_one_line(plugin, spec, match):
    plugin("kb_factories", "factory_model")
    with pytest.raises(InputError, match=match) as info:
        registry.resolve(spec)
    assert "\n" not in str(info.value)


def test_layer_zero_registry_does_not_import_torch():
    import subprocess

    code = "import sys, keepbits.registry as r; r.resolve('collections:OrderedDict'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_factory_module_in_the_working_folder_is_found_after_every_other_place(tmp_path, monkeypatch):
    """``keepbits`` started as a console script has no working folder on sys.path; ``python -m`` has.
    A factory module there is found (appended, so it cannot shadow an installed module)."""
    (tmp_path / "kb_cwd_models.py").write_text("def build(n=2):\n    return ('built', n)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    importlib.invalidate_caches()
    try:
        assert registry.resolve("kb_cwd_models:build")(n=3) == ("built", 3)
        assert sys.path[-1] == str(tmp_path)
    finally:
        sys.modules.pop("kb_cwd_models", None)
