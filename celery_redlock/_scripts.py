"""The Lua scripts run on every Redis node.

Each script is sent with EVALSHA; a node that answers NOSCRIPT gets the full
EVAL once (see ``_nodes.Fanout``). Keys and values are the same as every other
Redlock client writes (``SET resource token NX PX ttl``), so locks taken here
block redlock-py, pottery (on ``redlock:<key>``), node-redlock and redsync, and
theirs block ours.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field

__all__ = [
    "ACQUIRE",
    "ACQUIRE_FENCED",
    "EXTEND",
    "FENCE_WRITE",
    "INSPECT",
    "REASSIGN",
    "RELEASE",
    "RELEASE_OWNED",
    "Script",
]


@dataclass(frozen=True)
class Script:
    """A Lua script with its SHA1 digest, both as bytes ready for the wire."""

    source: bytes
    sha: bytes = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source).hexdigest().encode())

    def evalsha_head(self, nkeys: int, nargs: int) -> bytes:
        """The RESP start of ``EVALSHA sha nkeys``, before the keys and arguments."""
        return _evalsha_head(self.sha, nkeys, nargs)


@functools.lru_cache(maxsize=64)
def _evalsha_head(sha: bytes, nkeys: int, nargs: int) -> bytes:
    count = b"%d" % nkeys
    return b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n$%d\r\n%s\r\n" % (
        3 + nkeys + nargs,
        sha,
        len(count),
        count,
    )


# KEYS[1] the lock key; ARGV[1] the owner's token; ARGV[2] the TTL in ms;
# ARGV[3] (optional) a token the caller may take the key over from.
# Sets the key if it is free. If it already holds the same token, re-arms the
# TTL (an owner re-entering its own lock). If it holds ARGV[3] (a reservation
# such as a task id kept between a Celery run and its retry), replaces that
# token with the caller's. Returns 1 when it set the key, 3 when the key already
# held the caller's token (re-armed: a failed attempt must not delete it), 2 when
# it took the key over from ARGV[3], 0 when another token holds it.
ACQUIRE = Script(
    b"if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end "
    b"local v = redis.call('get', KEYS[1]) "
    b"if v == ARGV[1] then redis.call('pexpire', KEYS[1], ARGV[2]) return 3 end "
    b"if ARGV[3] and v == ARGV[3] then "
    b"redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 2 end "
    b"return 0"
)

# KEYS[1] the lock key; KEYS[2] the resource's fence counter key;
# ARGV[1] the owner's token; ARGV[2] the TTL in ms; ARGV[3] (optional) as ACQUIRE.
# As ACQUIRE, and also reads the node's fence counter and clock.
# Returns {as ACQUIRE: 1 set, 3 re-armed, 2 taken over, 0 held by another,
#          the fence counter (0 when unset), the node's clock in microseconds}.
# The counter is read on held nodes too: a node that still has the previous
# holder's key also has its fence, even when the others lost theirs.
ACQUIRE_FENCED = Script(
    b"if redis.replicate_commands then pcall(redis.replicate_commands) end "
    b"local t = redis.call('time') "
    b"local now = tonumber(t[1]) * 1000000 + tonumber(t[2]) "
    b"local held = 1 "
    b"if not redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then "
    b"local v = redis.call('get', KEYS[1]) "
    b"if v == ARGV[1] then redis.call('pexpire', KEYS[1], ARGV[2]) held = 3 "
    b"elseif ARGV[3] and v == ARGV[3] then "
    b"redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2]) held = 2 "
    b"else held = 0 end end "
    b"return {held, tonumber(redis.call('get', KEYS[2]) or '0'), now}"
)

# KEYS[1] the lock key; KEYS[2] the fence counter key;
# ARGV[1] the owner's token; ARGV[2] the new fence value.
# Raises the counter to ARGV[2] (never lowers it), only while the caller still
# holds the lock key. Returns 1 when the counter is now >= ARGV[2] under the
# caller's lock, 0 when the lock is no longer the caller's.
FENCE_WRITE = Script(
    b"if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end "
    b"local new = tonumber(ARGV[2]) "
    b"if tonumber(redis.call('get', KEYS[2]) or '0') < new then "
    b"redis.call('set', KEYS[2], ARGV[2]) end "
    b"return 1"
)

# KEYS[1] the lock key; ARGV[1] the owner's token.
# Deletes the key only if it holds the caller's token, and then publishes the
# key on the channel "celery_redlock:released:<key>" to wake its waiters (see
# _wakeup.py). The publish is a pcall: a user the ACL denies the channel to
# (Redis 7's default for new users) still releases; its waiters poll.
# Returns 1 when deleted, 0 when the key was absent or held by another token.
RELEASE = Script(
    b"if redis.call('get', KEYS[1]) == ARGV[1] then redis.call('del', KEYS[1]) "
    b"redis.pcall('publish', 'celery_redlock:released:' .. KEYS[1], KEYS[1]) return 1 end "
    b"return 0"
)

# KEYS[1] the lock key; ARGV[1] the token of an attempt that failed.
# As RELEASE, without waking the key's waiters: a failed attempt held no lock, so
# there is no release to announce (woken by every failed attempt's undo, waiters
# would try again at once, and again, for as long as a holder is missing from a
# minority of nodes, each waking the others).
# Returns 1 when deleted, 0 when the key was absent or held by another token.
UNDO = Script(
    b"if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end "
    b"return 0"
)

# KEYS[1] the lock key; ARGV[1] an owner's name; ARGV[2] what follows it in
# the tokens of the owner's runs ("|"; "" to match any token starting with ARGV[1]).
# As RELEASE, for the key holding the token ARGV[1] itself or any token
# "ARGV[1]ARGV[2]..." (one run of that owner: see Redlock.release(owner=True)
# and prefix=True).
RELEASE_OWNED = Script(
    b"local v = redis.call('get', KEYS[1]) "
    b"if v and (v == ARGV[1] or string.sub(v, 1, #ARGV[1] + #ARGV[2]) == ARGV[1] .. ARGV[2]) "
    b"then "
    b"redis.call('del', KEYS[1]) "
    b"redis.pcall('publish', 'celery_redlock:released:' .. KEYS[1], KEYS[1]) return 1 end "
    b"return 0"
)

# KEYS[1] the lock key; ARGV[1] the owner's token; ARGV[2] the new token;
# ARGV[3] the new TTL in ms.
# Gives the key a new token and TTL, only if it holds the caller's token.
# Returns 1 when done, 0 when the key was absent or held by another token.
REASSIGN = Script(
    b"if redis.call('get', KEYS[1]) == ARGV[1] then "
    b"redis.call('set', KEYS[1], ARGV[2], 'PX', ARGV[3]) return 1 end "
    b"return 0"
)

# KEYS[1] the lock key; ARGV[1] the owner's token; ARGV[2] the new TTL in ms.
# Re-arms the key's TTL only if it holds the caller's token.
# Returns 1 when re-armed, 0 when the key was absent or held by another token.
EXTEND = Script(
    b"if redis.call('get', KEYS[1]) == ARGV[1] then "
    b"return redis.call('pexpire', KEYS[1], ARGV[2]) end "
    b"return 0"
)

# KEYS[1] the lock key.
# Returns {token or nil, remaining TTL in ms (-2 when absent, -1 when no TTL)}.
INSPECT = Script(b"return {redis.call('get', KEYS[1]), redis.call('pttl', KEYS[1])}")

# KEYS[1] a hash of times; ARGV[1] ms to keep the hash; ARGV[2] how many fields
# to drop (n), ARGV[3] .. ARGV[2 + n] those fields; then field, time pairs
# (times as decimal numbers).
# Drops the n fields, raises each given field to its time (never lowers it), then
# keeps the hash ARGV[1] ms. Returns 1. (A record of times each node keeps on its
# own: read back, the highest time of each field on the nodes that answer is the
# latest noted.)
RAISE_TIMES = Script(
    b"local n = tonumber(ARGV[2]) "
    b"for i = 3, 2 + n do redis.call('hdel', KEYS[1], ARGV[i]) end "
    b"for i = 3 + n, #ARGV, 2 do "
    b"local old = tonumber(redis.call('hget', KEYS[1], ARGV[i])) "
    b"if not old or old < tonumber(ARGV[i + 1]) then "
    b"redis.call('hset', KEYS[1], ARGV[i], ARGV[i + 1]) end end "
    b"redis.call('pexpire', KEYS[1], ARGV[1]) "
    b"return 1"
)
