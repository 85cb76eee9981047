# Server-side functions for the gate's hot path (issue 10): a finished case gives its slot
# back, records its outcome and hands the slot on to the next case in one round trip, and a
# run's last case hands the run's slot on to the next run in the same call. The SQL is in the
# .sql file of the same name, frozen with this migration.

from pathlib import Path

from django.db import migrations

FUNCTIONS = Path(__file__).with_suffix(".sql").read_text()


class Migration(migrations.Migration):

    dependencies = [
        ('testruns', '0006_run_setting_bounds'),
    ]

    operations = [
        migrations.RunSQL(
            FUNCTIONS,
            reverse_sql=(
                "DROP FUNCTION IF EXISTS pcr_close_case(bigint, bigint, bigint, bigint, text, "
                "jsonb, boolean, boolean, text, double precision, double precision, text, text); "
                "DROP FUNCTION IF EXISTS pcr_finish_run(bigint, text, text); "
                "DROP FUNCTION IF EXISTS pcr_admit_runs(bigint, integer, text); "
                "DROP FUNCTION IF EXISTS pcr_admit_cases(bigint, bigint, integer, "
                "double precision, text);"
            ),
        ),
    ]
