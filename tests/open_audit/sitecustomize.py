"""Records every file a test's rectflow process opens for writing (tests/test_multihost_pipeline.py).

Active only when RECTFLOW_AUDIT_ROOT is set: paths under it opened with a writing mode are
appended to RECTFLOW_AUDIT_ROOT.opens.<RECTFLOW_AUDIT_ID>, one per line.
"""

import os
import sys

_root = os.environ.get("RECTFLOW_AUDIT_ROOT")
if _root:
    _root = os.path.realpath(_root)
    _log = f"{_root}.opens.{os.environ.get('RECTFLOW_AUDIT_ID', os.getpid())}"

    def _audit(event, args):
        if event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        mode, flags = args[1], args[2]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        path = os.path.realpath(os.fsdecode(args[0]))
        if writing and path.startswith(_root + os.sep):
            with open(_log, "a") as handle:  # outside _root: not audited again
                handle.write(path + "\n")

    sys.addaudithook(_audit)
