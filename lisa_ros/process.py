"""Starting the perception node as its own process, the way `ros2 launch` does it.

The demo, the tests and the benchmark use this; launch/perception.launch.py describes the same node
for `ros2 launch` (package lisa_ros, executable perception_node, parameters as a list of YAML files
and dictionaries, later entries winning).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Mapping, Sequence, Union

import yaml

from lisa_core.errors import ConfigurationError
from lisa_ros.parameters import EXECUTABLE, NODE_NAME, PACKAGE

LARGE_FRAMES_PROFILE = "fastdds_large_frames.xml"
PROFILE_VARIABLES = ("FASTDDS_DEFAULT_PROFILES_FILE", "FASTRTPS_DEFAULT_PROFILES_FILE")  # Jazzy, Humble


def installed_executable() -> Path:
    """lib/lisa_ros/perception_node of the lisa_ros install found on AMENT_PREFIX_PATH."""
    from ament_index_python.packages import PackageNotFoundError, get_package_prefix

    try:
        executable = Path(get_package_prefix(PACKAGE)) / "lib" / PACKAGE / EXECUTABLE
    except PackageNotFoundError as error:
        raise ConfigurationError(f"package {PACKAGE} is not installed (build it: tools/setup.sh, then "
                                 "source install/setup.bash)") from error
    if not executable.is_file():
        raise ConfigurationError(f"{executable} is missing: rebuild the package")
    return executable


def large_frames_profile() -> Path:
    """config/fastdds_large_frames.xml of the source tree, else of the installed share folder."""
    source = Path(__file__).resolve().parent.parent / "config" / LARGE_FRAMES_PROFILE
    if source.is_file():
        return source
    from ament_index_python.packages import get_package_share_directory

    return Path(get_package_share_directory(PACKAGE)) / "config" / LARGE_FRAMES_PROFILE


def use_large_frames_profile(env: dict) -> None:
    """Points Fast DDS at the large-frames profile in `env`, unless a profile is already chosen there.
    Set it before rclpy.init in this process, and pass `env` to the processes started."""
    if not any(env.get(name) for name in PROFILE_VARIABLES):
        for name in PROFILE_VARIABLES:
            env[name] = str(large_frames_profile())


def node_command(parameters: Sequence[Union[str, Path, Mapping]], params_dir: Path, namespace: str = "",
                 name: str = NODE_NAME, executable: Union[str, Path, None] = None) -> list[str]:
    """The command line that runs the node with `parameters` (YAML file paths and dictionaries, in
    order, later ones winning); dictionaries are written as YAML files into `params_dir`."""
    command = [str(executable or installed_executable()), "--ros-args", "-r", f"__node:={name}"]
    if namespace:
        command += ["-r", f"__ns:={namespace if namespace.startswith('/') else '/' + namespace}"]
    for index, entry in enumerate(parameters):
        if isinstance(entry, Mapping):
            path = Path(params_dir) / f"{name}_parameters_{index}.yaml"
            path.write_text(yaml.safe_dump({"/**": {"ros__parameters": dict(entry)}}))
            entry = path
        command += ["--params-file", str(entry)]
    return command


def start_node(command: Sequence[str], env: Mapping[str, str], log_path: Path) -> subprocess.Popen:
    """Starts the node with stdout and stderr going to `log_path`."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(list(command), env=dict(env), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT)
