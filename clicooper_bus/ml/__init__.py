"""Models, data and training maths. Imports torch; keep it out of command paths that do not
train."""
