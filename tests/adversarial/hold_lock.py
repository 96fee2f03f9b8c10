"""`python hold_lock.py DIR`: take DIR's run lock (`vlm_encoder.locks`), print `locked`, and hold it
until killed: a stand-in for another run writing DIR (test_locks.py)."""

from __future__ import annotations

import sys
import time

from vlm_encoder.locks import DirectoryLock

if __name__ == "__main__":
    lock = DirectoryLock(sys.argv[1], what="holder").acquire()
    print("locked", flush=True)
    while True:
        time.sleep(60)
