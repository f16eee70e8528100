"""The numeric formats a model can be loaded in, by name; torch-free, so configuration code (a ROS
launch file, a node's parameter declarations) can list them without importing torch."""

PRECISIONS = ("fp32", "bf16", "fp16")
QUANTIZATIONS = (None, "8bit", "4bit")  # None: weights in the precision above
