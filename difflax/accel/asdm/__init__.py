"""A-SDM placeholder: filled in the next step."""
from difflax.accel.asdm.inheritance import GRANULARITIES, inheritance_nodes, inheritance_plan

__all__ = ["GRANULARITIES", "inheritance_nodes", "inheritance_plan"]
