"""The auditor's library: replay a verified log, hand each attack its view, score, report."""
