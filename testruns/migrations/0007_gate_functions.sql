-- The gate's hot path as server-side functions (issue 10), installed by migration 0007.
-- Frozen with that migration: a later change is a new migration with CREATE OR REPLACE.
--
-- PL/pgSQL, not one statement with CTEs: under READ COMMITTED every statement of a VOLATILE
-- function takes a fresh snapshot, so the statements after the one that locks the semaphore
-- row see everything the previous holder of the lock committed (the gate's rule "lock first,
-- in its own statement", kept inside one round trip).

-- With the provider's semaphore row locked by the caller: per running run (priority desc,
-- queued_at), take its first pending cases up to its own room (max_concurrent_tests minus its
-- cases in flight), up to `free`; mark them running, lease them (the first one to `keeper`,
-- when given) and count them. Returns what it admitted.
CREATE OR REPLACE FUNCTION pcr_admit_cases(
    p_sem bigint, p_provider bigint, p_free integer, p_ttl double precision, p_keeper text
) RETURNS TABLE (result_id bigint, lease_id bigint, holder text)
LANGUAGE sql VOLATILE AS $$
    WITH runs AS (
        SELECT r.id, r.priority, r.queued_at, r.max_concurrent_tests -
               (SELECT count(*) FROM testruns_lease l
                WHERE l.run_id = r.id AND l.semaphore_id = p_sem) AS room
        FROM testruns_testrun r
        WHERE r.provider_id = p_provider AND r.status = 'running' AND NOT r.cancel_requested
    ), chosen AS (
        SELECT c.id FROM runs
        CROSS JOIN LATERAL (
            SELECT t.id, t.position FROM testruns_testresult t
            WHERE t.run_id = runs.id AND t.status = 'pending'
            ORDER BY t.position LIMIT GREATEST(runs.room, 0)
        ) c
        ORDER BY runs.priority DESC, runs.queued_at, runs.id, c.position
        LIMIT GREATEST(p_free, 0)
    ), promoted AS (
        UPDATE testruns_testresult t SET status = 'running', dispatched_at = NULL
        FROM chosen WHERE t.id = chosen.id AND t.status = 'pending'
        RETURNING t.id, t.run_id
    ), leased AS (
        INSERT INTO testruns_lease (semaphore_id, holder, run_id, result_id, acquired_at,
                                    expires_at)
        SELECT p_sem, CASE WHEN row_number() OVER (ORDER BY id) = 1 THEN p_keeper ELSE '' END,
               run_id, id, now(), now() + make_interval(secs => p_ttl)
        FROM promoted
        RETURNING testruns_lease.result_id, testruns_lease.id, testruns_lease.holder
    ), counted AS (
        UPDATE testruns_semaphore SET in_use = in_use + (SELECT count(*) FROM leased)
        WHERE id = p_sem
    )
    SELECT leased.result_id, leased.id, leased.holder FROM leased
$$;

-- A finished case, in one call (one round trip, one transaction in autocommit):
-- 1. give back its call slot, locking the provider's row first (and, after a success, grow
--    the AIMD ceiling back towards the limit);
-- 2. the fence: if its lease was already gone (reclaimed, cancelled), write nothing more;
-- 3. write its outcome, exactly once (only while the result is still `running`), taking the
--    columns `p_fields` names over the row's own (jsonb_populate_record);
-- 4. skip the run's pending cases when `p_skip_rest` (stop on failure); add to the totals,
--    and say whether the run is complete and whether a progress event is due;
-- 5. promote waiting cases into the free slots (the first kept for `p_keeper`).
CREATE OR REPLACE FUNCTION pcr_close_case(
    p_lease bigint, p_result bigint, p_run bigint, p_provider bigint,
    p_status text, p_fields jsonb, p_succeeded boolean, p_skip_rest boolean,
    p_keeper text, p_ttl double precision, p_event_interval double precision
) RETURNS TABLE (held boolean, written boolean, complete boolean, event_due boolean,
                 admitted jsonb)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_sem bigint;
    v_limit integer;
    v_in_use integer;
    v_effective double precision;
    v_gone bigint;
    v_ceiling integer;
    v_rows integer;
    v_skipped integer := 0;
    v_done integer;
    v_total integer;
    v_last_event timestamptz;
BEGIN
    held := false; written := false; complete := false; event_due := false;
    admitted := '[]'::jsonb;

    WITH gone AS (DELETE FROM testruns_lease WHERE id = p_lease RETURNING 1)
    UPDATE testruns_semaphore s SET in_use = s.in_use - (SELECT count(*) FROM gone),
        effective_limit = CASE
            WHEN NOT p_succeeded THEN s.effective_limit
            WHEN s.effective_limit + 1.0 / s.effective_limit >= s."limit" THEN NULL
            ELSE s.effective_limit + 1.0 / s.effective_limit END
    WHERE s.name = 'provider:' || p_provider
    RETURNING s.id, s."limit", s.in_use, s.effective_limit, (SELECT count(*) FROM gone)
    INTO v_sem, v_limit, v_in_use, v_effective, v_gone;
    IF v_sem IS NULL THEN
        RAISE EXCEPTION 'semaphore provider:% does not exist', p_provider;
    END IF;
    held := v_gone > 0;

    IF held THEN
        UPDATE testruns_testresult t SET
            (status, finished_at, prompt, output, assertion_results, score, latency_ms,
             tokens_in, tokens_out, cost, attempts, repeat_passes, repeat_results, cached,
             error) =
            (SELECT p_status, statement_timestamp(), f.prompt, f.output, f.assertion_results,
                    f.score, f.latency_ms, f.tokens_in, f.tokens_out, f.cost, f.attempts,
                    f.repeat_passes, f.repeat_results, f.cached, f.error
             FROM jsonb_populate_record(t, p_fields) f)
        WHERE t.id = p_result AND t.status = 'running';
        GET DIAGNOSTICS v_rows = ROW_COUNT;
        written := v_rows > 0;
    END IF;

    IF written THEN
        IF p_skip_rest THEN
            UPDATE testruns_testresult SET status = 'skipped', finished_at = statement_timestamp()
            WHERE run_id = p_run AND status = 'pending';
            GET DIAGNOSTICS v_skipped = ROW_COUNT;
        END IF;
        UPDATE testruns_testrun SET
            done_count = done_count + 1 + v_skipped,
            passed_count = passed_count + (p_status = 'passed')::integer,
            failed_count = failed_count + (p_status = 'failed')::integer,
            error_count = error_count + (p_status = 'error')::integer,
            tokens_in = tokens_in + COALESCE((p_fields->>'tokens_in')::bigint, 0),
            tokens_out = tokens_out + COALESCE((p_fields->>'tokens_out')::bigint, 0),
            cost = cost + COALESCE((p_fields->>'cost')::numeric, 0)
        WHERE id = p_run
        RETURNING done_count, total_cases, last_event_at INTO v_done, v_total, v_last_event;
        complete := v_done >= v_total;
        event_due := v_last_event IS NULL
            OR v_last_event < clock_timestamp() - make_interval(secs => p_event_interval);
    END IF;

    v_ceiling := CASE WHEN v_effective IS NULL THEN v_limit
                      ELSE LEAST(v_limit, floor(v_effective)::integer) END;
    IF v_in_use < v_ceiling THEN
        SELECT COALESCE(jsonb_agg(jsonb_build_array(a.result_id, a.lease_id, a.holder)),
                        '[]'::jsonb)
        INTO admitted
        FROM pcr_admit_cases(v_sem, p_provider, v_ceiling - v_in_use, p_ttl, p_keeper) a;
    END IF;
    RETURN NEXT;
END
$$;
