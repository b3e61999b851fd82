"""The Slicer extension's files fit together: UI names, CMake lists, install layout, metadata, imports.

Runs without the Slicer application. The CMake test configures and installs the extension against a
*stub* Slicer package (``SlicerConfig.cmake`` written below): it stands in for a Slicer build tree,
which does not exist here, and implements ``slicerMacroBuildScriptedModule`` and
``ctkMacroCompilePythonScript`` with the copy/install rules of the real macros (CTK's
``ctkMacroCompilePythonScript.cmake``), so a wrong path, a missing file or a wrong install layout fails.
"""

from __future__ import annotations

import ast
import py_compile
import re
import shutil
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "FastSAM3D"
UI_FILE = REPO / "Resources" / "UI" / "FastSAM3D.ui"
sys.path.insert(0, str(MODULE))


def ui_widgets():
    root = ET.parse(UI_FILE).getroot()
    return {w.get("name"): w.get("class") for w in root.iter("widget")}


def test_every_ui_name_the_code_uses_exists():
    widgets = ui_widgets()
    code = (MODULE / "FastSAM3D.py").read_text()
    used = set(re.findall(r"self\.ui\.(\w+)", code)) | set(re.findall(r"widget\.ui\.(\w+)", code))
    assert used, "the widget code uses no self.ui names?"
    missing = sorted(used - set(widgets))
    assert not missing, f"names used in FastSAM3D.py but absent from {UI_FILE.name}: {missing}"


def test_ui_file_declares_its_custom_widgets_and_connections():
    root = ET.parse(UI_FILE).getroot()
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    qt_classes = {"QLabel", "QCheckBox", "QPushButton", "QComboBox", "QSpinBox", "QProgressBar", "QWidget"}
    for name, cls in ui_widgets().items():
        assert cls in qt_classes or cls in declared, f"{name}: class {cls} is neither Qt nor declared"
    assert root.find("widget").get("class") == "qMRMLWidget"
    names = set(ui_widgets())
    for connection in root.iter("connection"):
        assert connection.findtext("sender") in names and connection.findtext("receiver") in names


def cmake_list(text, variable):
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"{variable} not set in FastSAM3D/CMakeLists.txt"
    return [item for item in match.group(1).split() if not item.startswith("#")]


def test_every_file_cmake_lists_exists_and_every_module_file_is_listed():
    text = (MODULE / "CMakeLists.txt").read_text()
    scripts = [s.replace("${MODULE_NAME}", "FastSAM3D") for s in cmake_list(text, "MODULE_PYTHON_SCRIPTS")]
    helpers = cmake_list(text, "MODULE_HELPER_SCRIPTS")
    resources = [s.replace("${MODULE_NAME}", "FastSAM3D") for s in cmake_list(text, "MODULE_PYTHON_RESOURCES")]
    for path in scripts + helpers:
        assert (MODULE / path).is_file(), f"CMake lists {path}, which does not exist"
    for path in resources:
        assert (REPO / "Resources" / path).is_file(), f"CMake lists Resources/{path}, which does not exist"
    on_disk = {p.relative_to(MODULE).as_posix() for p in MODULE.rglob("*.py") if "__pycache__" not in p.parts}
    assert on_disk == set(scripts) | set(helpers), "a Python file of the module is not packaged (or vice versa)"
    top = (REPO / "CMakeLists.txt").read_text()
    for required in ("project(FastSAM3D)", "find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})",
                     "add_subdirectory(FastSAM3D)", "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
                     "include(${Slicer_EXTENSION_CPACK})"):
        assert required in top


def s4ext_fields():
    fields = {}
    for line in (REPO / "FastSAM3D.s4ext").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            fields[key] = value.strip()
    return fields


def test_extension_metadata_is_consistent():
    fields = s4ext_fields()
    for key in ("scm", "scmurl", "homepage", "category", "contributors", "description", "iconurl", "screenshoturls", "depends"):
        assert fields.get(key), f"{key} is empty in FastSAM3D.s4ext"
    assert fields["scm"] == "git" and fields["category"] == "Segmentation"
    top = (REPO / "CMakeLists.txt").read_text()
    cmake = dict(re.findall(r'set\((EXTENSION_\w+) "([^"]*)"\)', top))
    assert cmake["EXTENSION_HOMEPAGE"] == fields["homepage"]
    assert cmake["EXTENSION_CATEGORY"] == fields["category"]
    assert cmake["EXTENSION_DESCRIPTION"] == fields["description"]
    assert cmake["EXTENSION_ICONURL"] == fields["iconurl"]
    assert cmake["EXTENSION_SCREENSHOTURLS"] == fields["screenshoturls"]
    assert cmake["EXTENSION_DEPENDS"] == fields["depends"]
    # The icon and screenshot the URLs point at exist in the repository.
    for url in (fields["iconurl"], fields["screenshoturls"]):
        local = REPO / url.split("/main/", 1)[1]
        assert local.is_file(), f"{local} (from {url}) is missing"
    from PIL import Image

    assert Image.open(REPO / "Resources/Icons/FastSAM3D.png").size == (128, 128)
    screenshot = REPO / "Resources/Screenshots/slicer_overlay.png"
    assert screenshot.stat().st_size < 300_000


def test_module_files_compile():
    for path in MODULE.rglob("*.py"):
        py_compile.compile(str(path), doraise=True)
    # The effect is found where the module registers it from.
    tree = ast.parse((MODULE / "FastSAM3D.py").read_text())
    source = ast.unparse(tree)
    assert "SegmentEditorFastSAM3DLib" in source and "SegmentEditorEffect.py" in source
    assert (MODULE / "SegmentEditorFastSAM3DLib" / "SegmentEditorEffect.py").is_file()


def test_logic_imports_without_torch():
    """Slicer loads the module at startup, before the user has agreed to install PyTorch."""
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any "import torch" now fails
        sys.path.insert(0, {str(MODULE)!r})
        import FastSAM3DLogic, FastSAM3DDownload, FastSAM3DDependencies
        errors = FastSAM3DLogic._errors()
        assert issubclass(errors.PromptError, ValueError)
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_dependency_plan():
    import FastSAM3DDependencies as deps

    missing = deps.missingRequirements(find_spec=lambda name: None if name in ("torch", "safetensors") else object())
    assert [r.module for r in missing] == ["torch", "safetensors"]
    with_extension = deps.installPlan(missing, True)
    without = deps.installPlan(missing, False)
    assert "PyTorch extension" in with_extension[0] and "with pip" in without[0]
    assert deps.missingRequirements(find_spec=lambda name: object()) == []


STUB_CONFIG = r"""
# Stand-in for a Slicer build tree (see the test module's docstring).
set(Slicer_FOUND TRUE)
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR "lib/Slicer-5.9/qt-scripted-modules")
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR "lib/Slicer-5.9/qt-scripted-modules")
set(Slicer_USE_FILE "${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake")
set(Slicer_EXTENSION_GENERATE_CONFIG "${CMAKE_CURRENT_LIST_DIR}/Empty.cmake")
set(Slicer_EXTENSION_CPACK "${CMAKE_CURRENT_LIST_DIR}/Empty.cmake")
"""

STUB_USE = r"""
include(CMakeParseArguments)
set(BUILD_TESTING OFF)
macro(ctkMacroCompilePythonScript)
  cmake_parse_arguments(MY "NO_INSTALL_SUBDIR;GLOBAL_TARGET" "TARGET_NAME;SOURCE_DIR;DESTINATION_DIR;INSTALL_DIR" "SCRIPTS;RESOURCES" ${ARGN})
  if(NOT DEFINED MY_SOURCE_DIR)
    set(MY_SOURCE_DIR ${CMAKE_CURRENT_SOURCE_DIR})
  endif()
  foreach(file IN LISTS MY_SCRIPTS MY_RESOURCES)
    if(NOT EXISTS "${MY_SOURCE_DIR}/${file}")
      message(FATAL_ERROR "${MY_TARGET_NAME}: no rule to make ${MY_SOURCE_DIR}/${file}")
    endif()
    configure_file("${MY_SOURCE_DIR}/${file}" "${MY_DESTINATION_DIR}/${file}" COPYONLY)
  endforeach()
  if(MY_NO_INSTALL_SUBDIR)
    install(DIRECTORY "${MY_DESTINATION_DIR}/" DESTINATION "${MY_INSTALL_DIR}")
  else()
    install(DIRECTORY "${MY_DESTINATION_DIR}" DESTINATION "${MY_INSTALL_DIR}")
  endif()
endmacro()
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY_SLICER "WITH_GENERIC_TESTS;WITH_SUBDIR;VERBOSE" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  foreach(file IN LISTS MY_SLICER_SCRIPTS MY_SLICER_RESOURCES)
    if(NOT EXISTS "${CMAKE_CURRENT_SOURCE_DIR}/${file}")
      message(FATAL_ERROR "slicerMacroBuildScriptedModule given nonexistent file ${file}")
    endif()
  endforeach()
  ctkMacroCompilePythonScript(TARGET_NAME ${MY_SLICER_NAME} SCRIPTS ${MY_SLICER_SCRIPTS} RESOURCES ${MY_SLICER_RESOURCES}
    DESTINATION_DIR ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}
    INSTALL_DIR ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR} NO_INSTALL_SUBDIR)
endmacro()
function(slicer_add_python_unittest)
endfunction()
"""


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
@pytest.mark.timeout(180)
def test_cmake_configure_and_install_layout(tmp_path):
    stub = tmp_path / "SlicerStub"
    stub.mkdir()
    (stub / "SlicerConfig.cmake").write_text(STUB_CONFIG)
    (stub / "UseSlicer.cmake").write_text(STUB_USE)
    (stub / "Empty.cmake").write_text("")
    build, prefix = tmp_path / "build", tmp_path / "install"
    configure = subprocess.run(["cmake", "-S", str(REPO), "-B", str(build), f"-DSlicer_DIR={stub}"],
                               capture_output=True, text=True, timeout=120)
    assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
    install = subprocess.run(["cmake", "--install", str(build), "--prefix", str(prefix)],
                             capture_output=True, text=True, timeout=120)
    assert install.returncode == 0, install.stderr[-3000:]
    scripted = prefix / "lib/Slicer-5.9/qt-scripted-modules"
    for relative in ("FastSAM3D.py", "SegmentEditorFastSAM3DLib/SegmentEditorEffect.py",
                     "FastSAM3DHelpers/FastSAM3DLogic.py", "FastSAM3DHelpers/FastSAM3DDownload.py",
                     "FastSAM3DHelpers/FastSAM3DDependencies.py", "FastSAM3DLib/__init__.py",
                     "FastSAM3DLib/session.py", "FastSAM3DLib/modeling/__init__.py", "Resources/UI/FastSAM3D.ui",
                     "Resources/Icons/FastSAM3D.png"):
        assert (scripted / relative).is_file(), f"{relative} is not installed"
    engine = {p.relative_to(REPO / "FastSAM3DLib").as_posix() for p in (REPO / "FastSAM3DLib").rglob("*.py")
              if "__pycache__" not in p.parts}
    installed = {p.relative_to(scripted / "FastSAM3DLib").as_posix() for p in (scripted / "FastSAM3DLib").rglob("*.py")}
    assert engine == installed
    # Only the module itself lies at the top (Slicer loads every .py there as a module).
    assert sorted(p.name for p in scripted.glob("*.py")) == ["FastSAM3D.py"]
    # From the installed layout, the logic finds the installed engine and its Resources/Models.
    code = textwrap.dedent(
        f"""
        import sys
        sys.path[:0] = [{str(scripted / 'FastSAM3DHelpers')!r}, {str(scripted)!r}]
        import FastSAM3DLogic
        FastSAM3DLogic._ensureEngineImportable()
        import FastSAM3DLib, FastSAM3DLib.checkpoint as checkpoint
        print(FastSAM3DLib.__file__)
        print(checkpoint.MODELS_DIR)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    engine_file, models_dir = result.stdout.split()[-2:]
    assert Path(engine_file).resolve().is_relative_to(scripted.resolve())
    assert Path(models_dir).resolve() == (scripted / "Resources" / "Models").resolve()
