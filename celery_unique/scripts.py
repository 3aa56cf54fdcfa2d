"""The Lua scripts, one constant each, with the KEYS and ARGV they take.

Every script touches the keys of one family only (one hash slot), so they run
unchanged on Redis Cluster. They use only commands of Redis 6.2.
"""

from __future__ import annotations

# Take the lock for an owner, or report who holds it: one round trip for both
# outcomes. A held lock is never taken, except from the ARGV[3] owner.
#   KEYS[1]  lock key
#   ARGV[1]  owner token (the task id)
#   ARGV[2]  time to live in milliseconds
#   ARGV[3]  the owner the lock may be taken from ("" for none): a retried or
#            replaced message passes its own id (re-entry), a task that
#            re-enqueues itself its running id (handover)
#   ARGV[4]  "1" when a WAIT follows on this connection (unique_lock_replicas):
#            a held lock is written again unchanged, so that the WAIT counts
#            the replicas that have the holder's lock too (see TOUCH)
# Returns the integer ttl when the lock is ours, or {holder, pttl} when another
# task holds it (a lone integer is the cheapest reply to read).
ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder == false or (ARGV[3] ~= '' and holder == ARGV[3]) then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    return tonumber(ARGV[2])
end
if ARGV[4] == '1' then
    redis.call('SET', KEYS[1], holder, 'KEEPTTL')
end
return {holder, redis.call('PTTL', KEYS[1])}
"""

# Write a lock again, unchanged, if it is still held by a given owner. WAIT
# counts the replicas that have what *its* connection wrote: after this write,
# which comes after the one that took the lock, a WAIT on the same connection
# counts the replicas that have the lock (unique_lock_replicas).
#   KEYS[1]  lock key
#   ARGV[1]  the holder's owner token
# Returns 1 when written, 0 when the lock is free or held by another.
TOUCH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
    return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'KEEPTTL')
return 1
"""

# Renew the owner's lock (and its companion keys) to at least a time to live,
# only if the owner still holds it. Never shortens a TTL: a renewal that
# lands after a retry re-entered the lock with a longer TTL changes nothing.
#   KEYS[1]  lock key
#   KEYS[2…] companion keys of the family (an idempotent call's argument digest)
#   ARGV[1]  owner token
#   ARGV[2]  time to live in milliseconds
# Returns 1 when the owner holds the lock, 0 when it was free or held by another.
EXTEND = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
    return 0
end
local ttl = tonumber(ARGV[2])
for _, key in ipairs(KEYS) do
    if redis.call('PTTL', key) < ttl then
        redis.call('PEXPIRE', key, ttl)
    end
end
return 1
"""

# Start a run: check or take the locks a lifetime needs while the task runs,
# and issue a fencing token. One call, one family (one slot).
#   KEYS[1]  queued lock (taken at delay(); may be absent for this mode)
#   KEYS[2]  running lock
#   KEYS[3]  fencing counter
#   KEYS[4]  stored outcome (idempotent tasks)
#   KEYS[5]  argument digest of the queued lock's holder (idempotent tasks)
#   KEYS[6]  done marker: the owners of the messages that last ran to their end
#   ARGV[1]  owner token
#   ARGV[2]  lifetime: until_executed | until_executing | while_executing |
#            until_and_while_executing
#   ARGV[3]  time to live of the held lock in milliseconds
#   ARGV[4]  "1" when the task is idempotent
#   ARGV[5]  the call's argument digest (idempotent tasks; "" otherwise)
#   ARGV[6]  "1" to check the done marker (a message with an owner token)
# Returns {1, fence, released} when the run may go on (released: 1 when it
# gave up its queued lock, as until_executing and until_and_while_executing
# do), {0, holder, pttl} on conflict, {2, outcome} when an idempotent task's
# outcome is already stored, or {3} when this very message already ran to its end.
#
# An idempotent run that holds the queued lock (until_executed) writes its
# argument digest with it: the message may have waited past its lock's TTL,
# and the digest is what tells a conflicting idempotency_key.
#
# The fence is max(previous + 1, server time in microseconds): it increases
# across holders even when the counter key has expired meanwhile (unless the
# server's clock steps back), so the counter lives only as long as the lock.
BEGIN_RUN = """
if redis.replicate_commands then redis.replicate_commands() end
local owner, mode, ttl = ARGV[1], ARGV[2], ARGV[3]
if ARGV[4] == '1' then
    local stored = redis.call('GET', KEYS[4])
    if stored then
        return {2, stored}
    end
end
local now = redis.call('TIME')
if ARGV[6] == '1' then
    local done_until = redis.call('ZSCORE', KEYS[6], owner)
    local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
    if done_until and tonumber(done_until) > now_ms then
        return {3}
    end
end
local held_key = KEYS[2]
local released = 0
if mode == 'until_executed' then
    held_key = KEYS[1]
elseif mode == 'until_executing' then
    if redis.call('GET', KEYS[1]) == owner then
        released = redis.call('DEL', KEYS[1])
    end
    held_key = nil
end
if held_key then
    local holder = redis.call('GET', held_key)
    if holder and holder ~= owner then
        return {0, holder, redis.call('PTTL', held_key)}
    end
    redis.call('SET', held_key, owner, 'PX', ttl)
    if held_key == KEYS[1] and ARGV[5] ~= '' then
        redis.call('SET', KEYS[5], ARGV[5], 'PX', ttl)
    end
    if mode == 'until_and_while_executing' and redis.call('GET', KEYS[1]) == owner then
        released = redis.call('DEL', KEYS[1])
    end
end
local fence = math.max(tonumber(redis.call('GET', KEYS[3]) or '0') + 1,
                       tonumber(now[1]) * 1000000 + tonumber(now[2]))
redis.call('SET', KEYS[3], string.format('%d', fence), 'PX', ttl)
return {1, fence, released}
"""

# Delete every given lock that the owner still holds (idempotent), and, at
# the end of a run, note that the owner's message ran to its end: a copy of it
# delivered again (an acknowledgement lost in a broker outage, a retry
# published while the first delivery was still held) is then discarded.
# The marker is a sorted set of owners scored by the time (ms) until which
# each is remembered: a hot key runs many messages before a copy of an early
# one comes back. It keeps the latest ARGV[3] owners and lives as long as the
# longest of them.
#   KEYS[1]  the family's done marker
#   KEYS[2…] lock keys of the family
#   ARGV[1]  owner token
#   ARGV[2]  time to live of the owner's note in milliseconds ("": none written)
#   ARGV[3]  owners kept at most
# Returns how many locks were deleted.
RELEASE_ALL = """
if redis.replicate_commands then redis.replicate_commands() end
local released = 0
for i = 2, #KEYS do
    if redis.call('GET', KEYS[i]) == ARGV[1] then
        released = released + redis.call('DEL', KEYS[i])
    end
end
if ARGV[2] ~= '' then
    local ttl = tonumber(ARGV[2])
    local now = redis.call('TIME')
    local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
    redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%d', now_ms))
    redis.call('ZADD', KEYS[1], string.format('%d', now_ms + ttl), ARGV[1])
    redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -1 - tonumber(ARGV[3]))
    if redis.call('PTTL', KEYS[1]) < ttl then
        redis.call('PEXPIRE', KEYS[1], ttl)
    end
end
return released
"""

# Take the lock of an idempotent task, or report its stored outcome or holder.
#   KEYS[1]  lock
#   KEYS[2]  stored outcome
#   KEYS[3]  argument digest of the lock's holder
#   ARGV[1]  owner token
#   ARGV[2]  time to live in milliseconds
#   ARGV[3]  the owner the lock may be taken from ("" for none)
#   ARGV[4]  argument digest of this call
# Returns the integer ttl when taken, {2, outcome} when an outcome is stored,
# or {0, holder, pttl, holder's argument digest} when another task holds it.
ACQUIRE_IDEMPOTENT = """
local stored = redis.call('GET', KEYS[2])
if stored then
    return {2, stored}
end
local holder = redis.call('GET', KEYS[1])
if holder == false or (ARGV[3] ~= '' and holder == ARGV[3]) then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    redis.call('SET', KEYS[3], ARGV[4], 'PX', ARGV[2])
    return tonumber(ARGV[2])
end
return {0, holder, redis.call('PTTL', KEYS[1]), redis.call('GET', KEYS[3]) or ''}
"""

# End an idempotent run: store its outcome (first one wins; "" stores
# nothing) and release the owner's locks, atomically. The argument digest
# belongs to the queued lock's holder: it goes when the queued lock is free,
# never while another call holds it (one that took the lock this run gave up
# at its start, say).
#   KEYS[1]  stored outcome
#   KEYS[2]  argument digest of the queued lock's holder
#   KEYS[3]  queued lock
#   KEYS[4…] lock keys to release (the queued lock among them, or not)
#   ARGV[1]  owner token
#   ARGV[2]  the outcome (JSON), or ""
#   ARGV[3]  its time to live in milliseconds
# Returns {stored, released}: stored is 1 when this call stored the outcome,
# released how many locks it deleted.
STORE_AND_RELEASE = """
local stored = 0
if ARGV[2] ~= '' and redis.call('SET', KEYS[1], ARGV[2], 'NX', 'PX', ARGV[3]) then
    stored = 1
end
local released = 0
for i = 4, #KEYS do
    if redis.call('GET', KEYS[i]) == ARGV[1] then
        released = released + redis.call('DEL', KEYS[i])
    end
end
if released > 0 and redis.call('EXISTS', KEYS[3]) == 0 then
    redis.call('DEL', KEYS[2])
end
return {stored, released}
"""

# -- fan-in -------------------------------------------------------------------
# A fan-in context is one hash (one slot): fields "parts" (how many, for the
# admin), "remaining" (parts still to report; pushed far below zero once
# closed), "failed", "state" (open |
# completed | failed | expired | refused), "policy", "callback", "errback" (both
# sealed: celery_unique.sealing), "deadline"
# (server time in ms, or absent), "e:<part>" (expected parts), "p:<part>" (a
# part's report, JSON, sealed), and, once closed, the publishing claim: "claim" (the
# claimant's id) and "until" (server time in ms when an unfinished claim may be
# taken over), and "started" once the callback or errback began to run.
#
# Closing the context and publishing its callback cannot be one atomic step:
# the callback goes to the broker. So the call that closes the context also
# claims the publishing, for a while; the claimant publishes and then deletes
# the context (FAN_IN_FINISH). A claimant that dies or meets a broker error
# leaves the context closed and its claim lapsing: a redelivered part or the
# workers' sweep (FAN_IN_SWEEP) takes the claim over and publishes.

_FAN_IN_CLAIMS = """
if redis.replicate_commands then redis.replicate_commands() end
local function now_ms()
    local t = redis.call('TIME')
    return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local ACTIONS = {completed = 1, failed = 2, expired = 3}
-- Claim the publishing of a context just closed, for claim_ms.
local function claim(claimant, claim_ms)
    redis.call('HSET', KEYS[1], 'claim', claimant, 'until', now_ms() + tonumber(claim_ms))
end
-- Take over a closed context's lapsed claim: its action (1 callback, 2 errback
-- of a failure, 3 errback of an expiry), or `otherwise` when there is nothing
-- to take (open, gone, a live claim). A context whose callback or errback began
-- to run was published: it is deleted.
local function take_over(claimant, claim_ms, otherwise)
    local state = redis.call('HGET', KEYS[1], 'state')
    local action = state and ACTIONS[state]
    if not action then
        return otherwise
    end
    -- The claimant's own call again (its reply was lost): the claim is its own.
    local mine = redis.call('HGET', KEYS[1], 'claim') == claimant
    if not mine and tonumber(redis.call('HGET', KEYS[1], 'until') or '0') > now_ms() then
        return otherwise
    end
    if redis.call('HEXISTS', KEYS[1], 'started') == 1 then
        redis.call('UNLINK', KEYS[1])
        return otherwise
    end
    claim(claimant, claim_ms)
    return action
end
-- Close an open context as expired and claim the publishing of its errback.
local function expire(claimant, claim_ms)
    redis.call('HSET', KEYS[1], 'state', 'expired')
    redis.call('HINCRBY', KEYS[1], 'remaining', -1000000000)
    claim(claimant, claim_ms)
    return 3
end
"""

# Create a fan-in context unless one exists for the token; atomic, so two
# creators of one token cannot both succeed (and no context lives without TTL).
#   KEYS[1]  context hash
#   ARGV[1]  time to live in milliseconds
#   ARGV[2]  the creator's own id (a retried call that already ran finds it)
#   ARGV[3]  the timeout in milliseconds ("" for none): the deadline is set from the server's clock
#   ARGV[4], ARGV[5], ...  field, value, field, value, ...
# Returns 1 when created (or created before by this creator), 0 when another
# creator's context exists (nothing changed).
FAN_IN_CREATE = (
    _FAN_IN_CLAIMS
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then
    if redis.call('HGET', KEYS[1], 'creator') == ARGV[2] then
        return 1
    end
    return 0
end
redis.call('HSET', KEYS[1], 'creator', ARGV[2])
if ARGV[3] ~= '' then
    redis.call('HSET', KEYS[1], 'deadline', now_ms() + tonumber(ARGV[3]))
end
-- In batches: Lua's unpack() cannot spread ten thousand parts at once.
for first = 4, #ARGV, 1000 do
    redis.call('HSET', KEYS[1], unpack(ARGV, first, math.min(first + 999, #ARGV)))
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""
)

# Add more expected parts to a context its creator made (FAN_IN_CREATE takes
# the first ones): a big fan-in is written in calls of a few thousand fields,
# none of which holds the server for long. Run before any part is published.
#   KEYS[1]  context hash
#   ARGV[1]  the creator's id
#   ARGV[2], ARGV[3], ...  field, value, field, value, ...
# Returns 1 when added, 0 when the context is not this creator's (or is gone).
FAN_IN_ADD = """
if redis.call('HGET', KEYS[1], 'creator') ~= ARGV[1] then
    return 0
end
for first = 2, #ARGV, 1000 do
    redis.call('HSET', KEYS[1], unpack(ARGV, first, math.min(first + 999, #ARGV)))
end
return 1
"""

# Record one part's report; tell the reporter whether it closed the set, in
# which case the reporter holds the publishing claim.
#   KEYS[1]  context hash
#   ARGV[1]  part name
#   ARGV[2]  the report (JSON)
#   ARGV[3]  "1" for a success, "0" for a failure
#   ARGV[4]  the fan-in's policy when the reporter knows it ("" to look it up)
#   ARGV[5]  the reporter's claimant id
#   ARGV[6]  how long a claim lasts, in milliseconds
# Returns 1: this report completed the set (the caller publishes the
# callback); 2: it failed a "fail" fan-in (the caller publishes the errback);
# 3: it took over the claim of an expired fan-in (the caller publishes the
# errback); 0: recorded, not complete; -1: a part already reported (counted
# once); -2: no such part or context; -3: the fan-in is already closed. A part
# reported again, or after the close, takes over a lapsed claim (1, 2 or 3).
FAN_IN_REPORT = (
    _FAN_IN_CLAIMS
    + """
if redis.call('HEXISTS', KEYS[1], 'e:' .. ARGV[1]) == 0 then
    return -2
end
if redis.call('HSETNX', KEYS[1], 'p:' .. ARGV[1], ARGV[2]) == 0 then
    return take_over(ARGV[5], ARGV[6], -1)
end
if ARGV[3] == '0' then
    redis.call('HINCRBY', KEYS[1], 'failed', 1)
    local policy = ARGV[4]
    if policy == '' then
        policy = redis.call('HGET', KEYS[1], 'policy')
    end
    if policy == 'fail' then
        -- Close it; the first failure finds it open (remaining was >= 0).
        if redis.call('HINCRBY', KEYS[1], 'remaining', -1000000000) > -1000000001 then
            redis.call('HSET', KEYS[1], 'state', 'failed')
            claim(ARGV[5], ARGV[6])
            return 2
        end
        return take_over(ARGV[5], ARGV[6], -3)
    end
end
local remaining = redis.call('HINCRBY', KEYS[1], 'remaining', -1)
if remaining == 0 then
    redis.call('HSET', KEYS[1], 'state', 'completed')
    claim(ARGV[5], ARGV[6])
    return 1
end
if remaining < 0 then
    return take_over(ARGV[5], ARGV[6], -3)
end
return 0
"""
)

# Close a fan-in now (an operator's or the API's expiry), if it is still open,
# and claim the publishing of its errback.
#   KEYS[1]  context hash
#   ARGV[1]  the claimant's id   ARGV[2]  how long a claim lasts, in ms
# Returns 3 when closed (the caller publishes the errback), 0 when it was not open.
FAN_IN_EXPIRE = (
    _FAN_IN_CLAIMS
    + """
if redis.call('HGET', KEYS[1], 'state') ~= 'open' then
    return 0
end
return expire(ARGV[1], ARGV[2])
"""
)

# The workers' look at a fan-in that is due: expire it at its deadline, or
# take over a lapsed publishing claim.
#   KEYS[1]  context hash
#   ARGV[1]  the claimant's id   ARGV[2]  how long a claim lasts, in ms
# Returns {action} (1, 2, 3 as FAN_IN_REPORT: the caller publishes),
# {0, when} (nothing to do before `when`, server ms; "" when nothing is
# scheduled: open, without a deadline), or {-2} (gone: nothing to do, ever).
FAN_IN_SWEEP = (
    _FAN_IN_CLAIMS
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
    return {-2}
end
if state == 'open' then
    local deadline = tonumber(redis.call('HGET', KEYS[1], 'deadline') or '')
    if not deadline then
        return {0, ''}
    end
    if deadline > now_ms() then
        return {0, tostring(deadline)}
    end
    return {expire(ARGV[1], ARGV[2])}
end
if not ACTIONS[state] then
    return {-2}  -- refused: nothing to do, ever
end
local action = take_over(ARGV[1], ARGV[2], 0)
if action ~= 0 then
    return {action}
end
if redis.call('EXISTS', KEYS[1]) == 0 then
    return {-2}
end
return {0, redis.call('HGET', KEYS[1], 'until') or ''}
"""
)

# Delete a context whose callback or errback the claimant published.
#   KEYS[1]  context hash   ARGV[1]  the claimant's id
# Returns 1 when deleted, 0 when the claim was another's (taken over).
FAN_IN_FINISH = """
if redis.call('HGET', KEYS[1], 'claim') ~= ARGV[1] then
    return 0
end
redis.call('UNLINK', KEYS[1])
return 1
"""

# Close a context for good whose values did not verify (a forgery, or keys
# that differ between processes): nothing takes its claim over again.
#   KEYS[1]  context hash   ARGV[1]  the claimant's id
# Returns 1 when refused, 0 when the claim was another's.
FAN_IN_REFUSE = """
if redis.call('HGET', KEYS[1], 'claim') ~= ARGV[1] then
    return 0
end
redis.call('HSET', KEYS[1], 'state', 'refused')
return 1
"""

# Give a claim up at once (the publish failed): the next look takes it over.
#   KEYS[1]  context hash   ARGV[1]  the claimant's id
# Returns 1 when given up, 0 when the claim was another's.
FAN_IN_UNCLAIM = """
if redis.call('HGET', KEYS[1], 'claim') ~= ARGV[1] then
    return 0
end
redis.call('HSET', KEYS[1], 'until', 0)
return 1
"""

# Note that a fan-in's callback or errback began to run (it was published):
# a claimant that died before FAN_IN_FINISH is then not replaced by a second
# publish. Nothing is written for a context that is gone.
#   KEYS[1]  context hash
FAN_IN_STARTED = """
if redis.call('EXISTS', KEYS[1]) == 1 then
    redis.call('HSET', KEYS[1], 'started', 1)
end
return 0
"""

# -- split contexts -------------------------------------------------------------

# Read a split context: its base ("" when none) and its log, at one moment.
#   KEYS[1]  base   KEYS[2]  log (list)
CONTEXT_VIEW = """
return {redis.call('GET', KEYS[1]) or '', redis.call('LRANGE', KEYS[2], 0, -1)}
"""

# Replace the base of a split context with a compacted one and drop the
# entries it absorbed, only while the compacting owner holds the lock. The
# context keeps its time to live: the one the compacting process knows, else
# the longest its keys have left (a process that does not know it).
#   KEYS[1]  base   KEYS[2]  log (list)   KEYS[3]  compaction lock
#   ARGV[1]  owner  ARGV[2]  new base     ARGV[3]  number of entries absorbed
#   ARGV[4]  the context's time to live in milliseconds ("" when not known)
# Returns 1 when compacted, 0 when the lock was lost (nothing changed).
CONTEXT_COMPACT = """
if redis.call('GET', KEYS[3]) ~= ARGV[1] then
    return 0
end
local ttl = tonumber(ARGV[4]) or math.max(redis.call('PTTL', KEYS[1]), redis.call('PTTL', KEYS[2]))
if ttl > 0 then
    redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl)
else
    redis.call('SET', KEYS[1], ARGV[2])
end
redis.call('LTRIM', KEYS[2], tonumber(ARGV[3]), -1)
redis.call('DEL', KEYS[3])
return 1
"""

# Lead the reaper: take or renew the leadership for an owner, or resign it.
# One reaper sweeps at a time across the fleet (several would be safe, each
# release being owner-checked, but would read the broker for nothing).
#   KEYS[1]  the leader key
#   ARGV[1]  the candidate (a worker's id, or a command's)
#   ARGV[2]  the lease in milliseconds, or "0" to resign
# Returns 1 when the candidate leads (or resigned), 0 when another leads.
LEAD = """
local leader = redis.call('GET', KEYS[1])
if leader ~= false and leader ~= ARGV[1] then
    return 0
end
if ARGV[2] == '0' then
    redis.call('DEL', KEYS[1])
else
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return 1
"""
