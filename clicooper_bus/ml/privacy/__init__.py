"""Privacy defences on the owner's side: what it releases (activations, labels) and what that
costs in differential privacy. Each module is one idea; `services/owner.py` wires them in as
filters on the release path, and the auditor measures them."""
