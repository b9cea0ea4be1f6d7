"""Hypercall handlers, one module per family; ``table.HYPERCALLS`` lists them all.

Event channels and grant tables keep their decoding beside their state
(``xen/evtchn/ops.py``, ``xen/gnttab/ops.py``); the table names those too.
"""
