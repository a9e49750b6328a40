"""Plumbing every layer shares: errors, units, paths, the atomic writer, stats, console, dtypes, devices.

May import: nothing of hetegen (third-party only; `devices` is the one module touching torch.cuda).
"""
