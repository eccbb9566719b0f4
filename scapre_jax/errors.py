"""Exceptions shared by the engine and the writers (no imports: both sides
may use them without depending on each other)."""


class NonFiniteWeightsError(ValueError):
  """NaN or infinite weights: the edit produced them, or a file holds them;
  nothing is saved."""
