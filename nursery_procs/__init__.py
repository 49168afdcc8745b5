"""Child processes and connections as safe as Trio tasks.

Every child process lives in a supervisor (a nursery): however the block exits,
each child is told to shut down, given a grace period, escalated to SIGTERM and
SIGKILL, and reaped.
"""

from ._context import Context as Context
from ._context import ContextStatistics as ContextStatistics
from ._context import context_by_id as context_by_id
from ._context import in_child as in_child
from ._context import parent as parent
from ._context import serve_requests as serve_requests
from ._control import open_control as open_control
from ._control import serve_control as serve_control
from ._errors import ChildStartError as ChildStartError
from ._errors import ContextDied as ContextDied
from ._errors import ContextError as ContextError
from ._errors import ControlSocketBusy as ControlSocketBusy
from ._errors import ForkServerError as ForkServerError
from ._errors import HandshakeError as HandshakeError
from ._errors import LinkClosed as LinkClosed
from ._errors import MainModuleError as MainModuleError
from ._errors import MessageUndeliverable as MessageUndeliverable
from ._errors import NurseryProcsError as NurseryProcsError
from ._errors import PoolClosed as PoolClosed
from ._errors import PoolEmpty as PoolEmpty
from ._errors import RemoteError as RemoteError
from ._errors import SSHError as SSHError
from ._errors import SupervisorError as SupervisorError
from ._errors import WireError as WireError
from ._forward import Forwarded as Forwarded
from ._forward import forward as forward
from ._isolation import Isolation as Isolation
from ._lifecycle import State as State
from ._link import Link as Link
from ._link import accept_link as accept_link
from ._link import connect_link as connect_link
from ._pool import Pool as Pool
from ._pool import PoolSettings as PoolSettings
from ._pool import PoolStatistics as PoolStatistics
from ._pool import WorkerPool as WorkerPool
from ._pool import open_pool as open_pool
from ._pool import open_worker_pool as open_worker_pool
from ._process import DEBUG_SLEEP_ENV as DEBUG_SLEEP_ENV
from ._process import START_METHOD_ENV as START_METHOD_ENV
from ._process import Policy as Policy
from ._process import describe_exit as describe_exit
from ._remote import RemoteTraceback as RemoteTraceback
from ._router import current_router as current_router
from ._signals import SignalShutdown as SignalShutdown
from ._signals import open_signal_shutdown as open_signal_shutdown
from ._ssh import SSH as SSH
from ._ssh import ssh as ssh
from ._supervisor import Restart as Restart
from ._supervisor import Supervisor as Supervisor
from ._supervisor import SupervisorStatistics as SupervisorStatistics
from ._supervisor import open_supervisor as open_supervisor
from ._version import __version__ as __version__
