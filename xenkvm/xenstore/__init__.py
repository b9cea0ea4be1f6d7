"""In-VMM xenstore: a xenstored-compatible store with guest-ring and UNIX-socket transports.

Nothing here depends on KVM; the same code runs embedded in the VMM and as the
standalone daemon ``xenkvm xenstored``.  Entry points:

* :class:`Xenstored` -- the store, watches, transactions, domains (no I/O);
* :class:`XenstoreServer` -- selector loop serving the UNIX socket, runnable in
  its own thread; :meth:`XenstoreServer.add_ring` attaches a guest's ring page;
* :class:`RingConnection` -- one domain's ``xenstore_domain_interface`` page;
* :mod:`.state` -- save/load the whole store; :mod:`.daemon` -- the CLI.
* :mod:`.hostd` / :mod:`.introduce` -- the shared daemon's introduce socket, where
  VMMs hand over their domains' rings (memfd + eventfds over SCM_RIGHTS).
"""

from .dispatch import Xenstored
from .perms import Perm, PermFlag
from .protocol import XenstoreError, XsError, XsType
from .quota import Quotas
from .ring import RingConnection
from .server import XenstoreServer, default_socket_path

__all__ = ["Perm", "PermFlag", "Quotas", "RingConnection", "XenstoreError", "XenstoreServer",
           "Xenstored", "XsError", "XsType", "default_socket_path"]
