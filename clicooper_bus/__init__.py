"""CliCooper bus: cooperative split learning under partial trust.

The library knows nothing of processes: `services/` wires it into processes and `tools/` holds
the offline commands. Importing this package does not import torch.
"""

__version__ = "0.1.0"
