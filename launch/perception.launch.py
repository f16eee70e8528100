"""Starts the LISA perception node.

    ros2 launch lisa_ros perception.launch.py
    ros2 launch lisa_ros perception.launch.py model_path:=/models/LISA-7B-v1 device:=cuda precision:=bf16 \
        image_topic:=/camera/color/image_raw \
        depth_topic:=/camera/aligned_depth_to_color/image_raw \
        camera_info_topic:=/camera/color/camera_info namespace:=arm_camera

Launch arguments (`ros2 launch lisa_ros perception.launch.py --show-args`):
    autostart          true: configure (load the model) and activate at start; false: wait for the
                       lifecycle transitions (ros2 lifecycle set /lisa_perception configure, activate)
    model_path         model folder; empty: the embedded demo model
    device             cpu, cuda or cuda:<index>
    precision          fp32, bf16 or fp16
    image_topic        camera frames
    depth_topic        depth registered to the frames; empty: no depth
    camera_info_topic  intrinsics of the frames
    namespace          namespace of the node and of its relative topic names
    params_file        YAML with the other parameters (default: the installed config/perception.yaml)
The arguments override the same parameters in params_file.

The node subscribes to each camera topic as reliably as the camera publishes (image_reliability auto).
Frames of 720p and larger at 30 Hz need a setting in the camera driver's process, not in the node's:
Fast DDS's 0.5 MB shared-memory segment belongs to the publisher and loses best-effort frames (half of
them at 720p), so start the driver with
    FASTDDS_DEFAULT_PROFILES_FILE=<install>/share/lisa_ros/config/fastdds_large_frames.xml
(a 32 MB segment; FASTRTPS_DEFAULT_PROFILES_FILE too on Humble), or give it a reliable image QoS.
Nothing set for the node alone (that profile, FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA, a 4 MB socket
buffer) changed what arrived, so this file sets none (README "Camera QoS", bench/results_node.md).

`node_description` is plain Python so that tests can check what this file starts without `launch`
installed; `generate_launch_description` imports launch lazily and passes that description on.
"""

from pathlib import Path

from lisa_ros.parameters import EXECUTABLE, NODE_NAME, PACKAGE, PARAMETERS_BY_NAME

# The launch arguments that are node parameters of the same name: their defaults and descriptions.
PARAMETER_ARGUMENTS = ("autostart", "model_path", "device", "precision", "image_topic", "depth_topic",
                       "camera_info_topic")
# (name, default, description); the params_file default is filled in from the installed share folder.
LAUNCH_ARGUMENTS = (
    *((name, str(PARAMETERS_BY_NAME[name].default).lower() if isinstance(PARAMETERS_BY_NAME[name].default, bool)
       else PARAMETERS_BY_NAME[name].default, PARAMETERS_BY_NAME[name].description)
      for name in PARAMETER_ARGUMENTS),
    ("namespace", "", "Namespace of the node and its relative topic names."),
    ("params_file", None, "YAML parameters file; the launch arguments above override it."),
)
# Launch arguments are strings; these parameters are not.
BOOLEAN_ARGUMENTS = ("autostart",)


def default_params_file(share_dir) -> str:
    return str(Path(share_dir) / "config" / "perception.yaml")


def node_description(arguments) -> dict:
    """Keyword arguments of launch_ros's Node for the given launch argument values.

    The parameters list is the params file, then a dictionary of the argument parameters, which wins.
    """
    return dict(
        package=PACKAGE,
        executable=EXECUTABLE,
        name=NODE_NAME,
        namespace=arguments["namespace"],
        parameters=[arguments["params_file"], {name: arguments[name] for name in PARAMETER_ARGUMENTS}],
        output="screen",
        emulate_tty=True,
    )


def generate_launch_description():
    from ament_index_python.packages import get_package_share_directory
    from launch import LaunchDescription
    from launch.actions import DeclareLaunchArgument
    from launch.substitutions import LaunchConfiguration
    from launch_ros.actions import Node
    from launch_ros.parameter_descriptions import ParameterValue

    defaults = {"params_file": default_params_file(get_package_share_directory(PACKAGE))}
    declarations = [DeclareLaunchArgument(name, default_value=defaults.get(name, default), description=text)
                    for name, default, text in LAUNCH_ARGUMENTS]
    # Explicit value types: without them, launch would read "" or "1" as YAML.
    arguments = {name: LaunchConfiguration(name) for name, _, _ in LAUNCH_ARGUMENTS}
    arguments.update({name: ParameterValue(LaunchConfiguration(name),
                                           value_type=bool if name in BOOLEAN_ARGUMENTS else str)
                      for name in PARAMETER_ARGUMENTS})
    return LaunchDescription([*declarations, Node(**node_description(arguments))])
