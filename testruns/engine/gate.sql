-- The gate's SQL, one named query each, read by testruns/engine/gate.py at import.
-- {placeholders} are fragments gate.py fills in; %(name)s / %s are parameters.

-- name: ensure_semaphore
-- Create a semaphore row with its first limit, unless it exists.
INSERT INTO testruns_semaphore (name, "limit", in_use, corrections, updated_at)
VALUES (%s, %s, 0, 0, now()) ON CONFLICT (name) DO NOTHING

-- name: recreate_provider_semaphore
-- A provider's semaphore deleted while idle comes back with the provider's max_concurrency.
INSERT INTO testruns_semaphore (name, "limit", in_use, corrections, updated_at)
SELECT %s, max_concurrency, 0, 0, now() FROM testruns_provider WHERE id = %s
ON CONFLICT (name) DO NOTHING

-- name: set_limit
-- Change a limit and nothing else (in_use and the AIMD ceiling are the gate's).
UPDATE testruns_semaphore SET "limit" = %s, updated_at = now() WHERE name = %s

-- name: lock
-- Lock a semaphore row; (id, limit, in_use, effective_limit).
SELECT id, "limit", in_use, effective_limit FROM testruns_semaphore WHERE name = %s FOR UPDATE

-- name: admit_runs
-- With "runs" locked: pick up to %(free)s queued runs in queue order, skipping runs whose
-- launcher is at the per-user limit; mark them running, lease their slots, count them.
WITH user_limit AS (
    SELECT COALESCE((SELECT "limit" FROM testruns_semaphore WHERE name = %(per_user)s), 0) AS n
), running_per_user AS (
    SELECT r.launched_by_id AS user_id, count(*) AS n
    FROM testruns_lease l JOIN testruns_testrun r ON r.id = l.run_id
    WHERE l.semaphore_id = %(sem)s AND l.result_id IS NULL
    GROUP BY r.launched_by_id
), queue AS (
    SELECT r.id, r.priority, r.queued_at, r.launched_by_id,
           row_number() OVER (PARTITION BY r.launched_by_id
                              ORDER BY r.priority DESC, r.queued_at, r.id) AS nth_of_user
    FROM testruns_testrun r
    WHERE r.status = 'queued' AND NOT r.cancel_requested
), chosen AS (
    SELECT q.id FROM queue q LEFT JOIN running_per_user u ON u.user_id = q.launched_by_id
    WHERE (SELECT n FROM user_limit) = 0 OR q.launched_by_id IS NULL
       OR q.nth_of_user + COALESCE(u.n, 0) <= (SELECT n FROM user_limit)
    ORDER BY q.priority DESC, q.queued_at, q.id
    LIMIT %(free)s
), promoted AS (
    UPDATE testruns_testrun r SET status = 'running', phase = 'generating',
        started_at = statement_timestamp()
    FROM chosen WHERE r.id = chosen.id AND r.status = 'queued'
    RETURNING r.id, r.provider_id
), leased AS (
    -- A run slot is held until the run ends; only case leases are heartbeated and expire.
    INSERT INTO testruns_lease (semaphore_id, holder, run_id, acquired_at, expires_at)
    SELECT %(sem)s, 'run:' || id, id, now(), now() + interval '100 years' FROM promoted
    RETURNING run_id
), counted AS (
    UPDATE testruns_semaphore SET in_use = in_use + (SELECT count(*) FROM leased)
    WHERE id = %(sem)s
)
SELECT id, provider_id FROM promoted ORDER BY id

-- name: delete_leases
-- Delete the leases matching {where} and lower in_use by as many, per semaphore.
WITH gone AS (DELETE FROM testruns_lease WHERE {where} RETURNING semaphore_id)
UPDATE testruns_semaphore s SET in_use = s.in_use - g.n
FROM (SELECT semaphore_id, count(*) AS n FROM gone GROUP BY semaphore_id) g
WHERE s.id = g.semaphore_id

-- name: admit_cases
-- With "provider:<id>" locked: per running run (priority desc, queued_at), take its first
-- pending cases up to its own room, up to the provider's free slots; mark them running,
-- lease them (the first one to the keeper, when given) and count them. The statement is the
-- server-side function pcr_admit_cases (migration 0007), which pcr_close_case also calls.
SELECT result_id, lease_id, holder FROM pcr_admit_cases(%(sem)s, %(provider)s, %(free)s,
                                                        %(ttl)s, %(keeper)s)

-- name: close_case
-- A finished case in one round trip: give back its slot (the fence), write its outcome
-- exactly once, count it in the run's totals and promote the next cases: pcr_close_case
-- (migration 0007).
SELECT held, written, complete, event_due, admitted FROM pcr_close_case(
    %(lease)s, %(result)s, %(run)s, %(provider)s, %(status)s, %(fields)s::jsonb,
    %(succeeded)s, %(skip_rest)s, %(keeper)s, %(ttl)s, %(event_interval)s)

-- name: claim_case
-- Take over an admitted case's unclaimed, unexpired lease for this worker.
UPDATE testruns_lease SET holder = %s, expires_at = now() + make_interval(secs => %s)
WHERE result_id = %s AND holder = '' AND expires_at > now() RETURNING id

-- name: release_case
-- One round trip: delete the lease, give its slot back ({grow}: the AIMD ceiling after a
-- success), and return the row as it now is and whether there was a lease to delete.
WITH gone AS (DELETE FROM testruns_lease WHERE id = %(lease)s RETURNING semaphore_id)
UPDATE testruns_semaphore s SET in_use = s.in_use - (SELECT count(*) FROM gone){grow}
WHERE s.name = %(name)s
RETURNING s.id, s."limit", s.in_use, s.effective_limit, (SELECT count(*) FROM gone)

-- name: grow_ceiling
-- After a successful call: the AIMD ceiling grows back towards the limit (additive increase),
-- and is lifted (NULL) once it reaches it. A fragment of release_case.
, effective_limit = CASE WHEN s.effective_limit + 1.0 / s.effective_limit >= s."limit"
    THEN NULL ELSE s.effective_limit + 1.0 / s.effective_limit END

-- name: throttle_provider
-- Halve the provider's ceiling unless it was halved after the throttled request went out.
UPDATE testruns_semaphore SET effective_limit =
    GREATEST(1, COALESCE(effective_limit, "limit") / 2), throttled_at = statement_timestamp()
WHERE name = %s AND (throttled_at IS NULL OR
      throttled_at <= statement_timestamp() - make_interval(secs => %s))
RETURNING id

-- name: heartbeat
-- Extend the leases this worker process is working on.
UPDATE testruns_lease SET expires_at = now() + make_interval(secs => %s)
WHERE holder = %s AND id = ANY(%s)

-- name: providers_holding
-- The providers whose case leases match {condition}.
SELECT DISTINCT r.provider_id FROM testruns_lease l JOIN testruns_testrun r ON r.id = l.run_id
WHERE l.result_id IS NOT NULL AND {condition}

-- name: leased_results
-- With the provider locked: the results whose leases on it match {condition}.
SELECT l.result_id FROM testruns_lease l
WHERE l.semaphore_id = %s AND l.result_id IS NOT NULL AND {condition}

-- name: results_to_pending
-- Cases whose lease was taken back wait again.
UPDATE testruns_testresult SET status = 'pending' WHERE id = ANY(%s) AND status = 'running'

-- name: drifted
-- Semaphores whose in_use differs from their lease rows (one snapshot: no false alarms).
SELECT s.name FROM testruns_semaphore s
LEFT JOIN (SELECT semaphore_id, count(*) AS n FROM testruns_lease GROUP BY semaphore_id) c
       ON c.semaphore_id = s.id
WHERE s.in_use <> COALESCE(c.n, 0) ORDER BY s.name

-- name: recount
-- With the semaphore locked: set in_use to its lease count, counting the correction.
WITH counted AS (
    SELECT s.id, s.in_use AS was,
           (SELECT count(*) FROM testruns_lease l WHERE l.semaphore_id = s.id) AS n
    FROM testruns_semaphore s WHERE s.name = %s
)
UPDATE testruns_semaphore s SET in_use = counted.n, corrections = s.corrections + 1
FROM counted WHERE s.id = counted.id AND counted.was <> counted.n
RETURNING s.name, counted.was, counted.n
