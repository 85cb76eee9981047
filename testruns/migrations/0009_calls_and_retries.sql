-- pcr_close_case again (issue 12): it also writes a result's retries (apart from its
-- repeats) and counts a run's model calls done (cases x repeats), so that progress moves
-- with every call of a run with repeats. Frozen with migration 0009.

-- A finished case, in one call (one round trip, one transaction in autocommit), as in
-- migration 0007, and now also its retries and the run's calls done (issue 12):
-- 1. give back its call slot, locking the provider's row first (and, after a success, grow
--    the AIMD ceiling back towards the limit);
-- 2. the fence: if its lease was already gone (reclaimed, cancelled), write nothing more;
-- 3. write its outcome, exactly once (only while the result is still `running`), taking the
--    columns `p_fields` names over the row's own (jsonb_populate_record);
-- 4. skip the run's pending cases when `p_skip_rest` (stop on failure); add to the totals,
--    and say whether the run is complete and whether a progress event is due;
-- 5. if that was the run's last case, finish the run and promote the next runs
--    (pcr_finish_run: "runs" is locked after the provider's row, in name order);
-- 6. promote waiting cases into the free slots (the first kept for `p_keeper`, with its
--    case's fields), a run just promoted on this provider included: a run hands over to the
--    next in the same call.
CREATE OR REPLACE FUNCTION pcr_close_case(
    p_lease bigint, p_result bigint, p_run bigint, p_provider bigint,
    p_status text, p_fields jsonb, p_succeeded boolean, p_skip_rest boolean,
    p_keeper text, p_ttl double precision, p_event_interval double precision,
    p_runs text, p_per_user text
) RETURNS TABLE (held boolean, written boolean, complete boolean, event_due boolean,
                 admitted jsonb, finished text, promoted jsonb)
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
    admitted := '[]'::jsonb; finished := NULL; promoted := '[]'::jsonb;

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
             tokens_in, tokens_out, cost, attempts, retries, repeat_passes, repeat_results,
             cached, error) =
            (SELECT p_status, statement_timestamp(), f.prompt, f.output, f.assertion_results,
                    f.score, f.latency_ms, f.tokens_in, f.tokens_out, f.cost, f.attempts,
                    f.retries, f.repeat_passes, f.repeat_results, f.cached, f.error
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
            -- Every call the case and the skipped cases stood for is done now, less those
            -- the worker counted while the case ran (`calls_counted`, not a column).
            calls_done = calls_done + GREATEST(
                GREATEST(repeats, 1) * (1 + v_skipped)
                - COALESCE((p_fields->>'calls_counted')::integer, 0), 0),
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
        IF complete THEN
            SELECT f.finished, f.promoted INTO finished, promoted
            FROM pcr_finish_run(p_run, p_runs, p_per_user) f;
        END IF;
    END IF;

    v_ceiling := CASE WHEN v_effective IS NULL THEN v_limit
                      ELSE LEAST(v_limit, floor(v_effective)::integer) END;
    IF v_in_use < v_ceiling THEN
        -- The case kept for the keeper comes with what running it reads (its thread then
        -- needs no query to load it).
        SELECT COALESCE(jsonb_agg(jsonb_build_array(
                   a.result_id, a.lease_id, a.holder, a.run_id,
                   CASE WHEN a.holder <> '' THEN jsonb_build_object(
                       'case_id', t.case_id, 'position', t.position, 'case_name', t.case_name,
                       'variables', t.variables, 'assertions', t.assertions,
                       'threshold', t.threshold) END)), '[]'::jsonb)
        INTO admitted
        FROM pcr_admit_cases(v_sem, p_provider, v_ceiling - v_in_use, p_ttl, p_keeper) a
        JOIN testruns_testresult t ON t.id = a.result_id;
    END IF;
    RETURN NEXT;
END
$$;
