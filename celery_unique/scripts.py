"""The Lua scripts, one constant each, with the KEYS and ARGV they take.

Every script touches the keys of one family only (one hash slot), so they run
unchanged on Redis Cluster. They use only commands of Redis 6.2.
"""

from __future__ import annotations

# Take the lock for an owner, re-enter it, or report who holds it: one round
# trip for both outcomes.
#   KEYS[1]  lock key
#   ARGV[1]  owner token (the task id)
#   ARGV[2]  time to live in milliseconds
#   ARGV[3]  an owner the lock may be handed over from ("" for none): a task
#            that re-enqueues itself passes its own id
# Returns the integer ttl when the lock is ours, or {holder, pttl} when another
# task holds it (a lone integer is the cheapest reply to read).
ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] or (ARGV[3] ~= '' and holder == ARGV[3]) then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    return tonumber(ARGV[2])
end
return {holder, redis.call('PTTL', KEYS[1])}
"""

# Delete the lock only if the owner still holds it (idempotent).
#   KEYS[1]  lock key
#   ARGV[1]  owner token
# Returns 1 when deleted, 0 when the lock was free or held by another.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""

# Give the owner's lock a new time to live, only if the owner still holds it.
#   KEYS[1]  lock key
#   ARGV[1]  owner token
#   ARGV[2]  time to live in milliseconds
# Returns 1 when extended, 0 when the lock was free or held by another.
EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
