"""The node's reported lifecycle state is a primary state even while a transition runs: diagnostics
published from another thread during on_configure (a model that fails to load) say "unconfigured", the
state the transition leaves."""

from ros_support import ros_session


def test_lifecycle_state_during_a_transition_is_the_state_it_leaves(tmp_path):
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter

    from lisa_ros.perception_node import PerceptionNode

    seen = []

    class RecordingNode(PerceptionNode):
        def on_configure(self, state):
            seen.append(self.lifecycle_state)
            return super().on_configure(state)

    with ros_session(tmp_path) as ros:
        node = RecordingNode(context=ros["context"], parameter_overrides=[
            Parameter("autostart", value=False), Parameter("model_path", value=str(tmp_path / "no_such_model"))])
        try:
            assert node.trigger_configure() == TransitionCallbackReturn.FAILURE  # the model cannot load
            assert seen == ["unconfigured"], seen
            assert node.lifecycle_state == "unconfigured"
        finally:
            node.close()
            node.destroy_node()
