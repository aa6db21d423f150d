"""``colcon build`` of the package in a fresh workspace installs what a ROS user runs: the launch files, the config,
the Fast DDS profile, the model and both executables, and the installed fusion_node starts from that install alone
(the shipped model and profile found through the ament index, not the source tree)."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from node_harness import DOMAIN

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ("package.xml", "setup.py", "setup.cfg", "resource", "ivf_ros", "launch", "config", "models")
SHARE = ("package.xml", "launch/fusion.launch.py", "launch/two_cameras.launch.py", "config/fusion.yaml",
         "config/fastdds.xml", "models/ivf_student.safetensors", "models/ivf_student.json")


def test_colcon_build_in_a_fresh_workspace_installs_and_runs(tmp_path):
    colcon = Path(sys.executable).with_name("colcon")
    colcon = str(colcon) if colcon.is_file() else shutil.which("colcon")
    assert colcon, "colcon is not installed: pip install colcon-common-extensions (in requirements.txt)"
    src = tmp_path / "ws" / "src" / "ivf_ros"
    src.mkdir(parents=True)
    for name in PACKAGE:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree
                                         else {}))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "AMENT_PREFIX_PATH", "COLCON_PREFIX_PATH",
                                                            "FASTDDS_DEFAULT_PROFILES_FILE")}
    build = subprocess.run([colcon, "build", "--event-handlers", "console_direct-"], cwd=tmp_path / "ws", env=env,
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    prefix = tmp_path / "ws" / "install" / "ivf_ros"
    missing = [f for f in SHARE if not (prefix / "share" / "ivf_ros" / f).is_file()]
    missing += [f for f in ("fusion_node", "ivf") if not os.access(prefix / "lib" / "ivf_ros" / f, os.X_OK)]
    assert not missing, f"not installed: {missing}"

    site = next((prefix / "lib").glob("python3*/site-packages"))
    env.update(PYTHONPATH=str(site), AMENT_PREFIX_PATH=str(prefix), ROS_DOMAIN_ID=str(DOMAIN))
    where = subprocess.run(
        [sys.executable, "-c", "import ivf_ros; from ivf_ros import checkpoint, dds; "
         "print(ivf_ros.__file__, checkpoint.default_checkpoint(), dds.use_fastdds_profile(), sep='\\n')"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr
    assert where.stdout.split() == [str(site / "ivf_ros" / "__init__.py"),
                                    str(prefix / "share" / "ivf_ros" / "models" / "ivf_student.safetensors"),
                                    str(prefix / "share" / "ivf_ros" / "config" / "fastdds.xml")]

    node = subprocess.Popen([str(prefix / "lib" / "ivf_ros" / "fusion_node"), "--ros-args", "-r", "__ns:=/colcon",
                             "-p", "device:=cpu"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and node.poll() is None:
            lines.append(node.stdout.readline())
            if "fusing on cpu: /colcon/ir/image + /colcon/visible/image" in lines[-1]:
                break
        assert node.poll() is None, "".join(lines) + node.stdout.read()
    finally:
        if node.poll() is None:
            node.send_signal(signal.SIGINT)
        out, _ = node.communicate(timeout=30)
    assert node.returncode == 0, "".join(lines) + out
