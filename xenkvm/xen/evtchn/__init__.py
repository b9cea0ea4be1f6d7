"""Event channels (``domain.evtchn``): the port table, 2-level and FIFO delivery,
EVTCHNOP decoding, SCHEDOP_poll and the VMM services' ports API.

``EventChannels`` (channels.py) composes the pieces; see its docstring for the
layout and ``vmm.py`` for the API backends use.
"""
from xenkvm.xen.evtchn.channels import EventChannels
from xenkvm.xen.evtchn.ports import Port, PortState, VmmEnd
from xenkvm.xen.evtchn.vmm import EvtchnError

__all__ = ["EventChannels", "EvtchnError", "Port", "PortState", "VmmEnd"]
