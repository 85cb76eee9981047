# The product's bounds on a run's settings, declared once on the model (issue 9): the launch
# page, the admin, the API and the CLI read them from these validators.

import django.core.validators
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('testruns', '0005_repeats_grader_throttle'),
    ]

    operations = [
        migrations.AlterField(
            model_name='testrun',
            name='max_concurrent_tests',
            field=models.PositiveIntegerField(default=4, validators=[django.core.validators.MinValueValidator(1), django.core.validators.MaxValueValidator(64)]),
        ),
        migrations.AlterField(
            model_name='testrun',
            name='max_retries',
            field=models.PositiveIntegerField(default=2, validators=[django.core.validators.MinValueValidator(0), django.core.validators.MaxValueValidator(10)]),
        ),
        migrations.AlterField(
            model_name='testrun',
            name='priority',
            field=models.IntegerField(default=0, help_text='Higher runs first.', validators=[django.core.validators.MinValueValidator(-100), django.core.validators.MaxValueValidator(100)]),
        ),
        migrations.AlterField(
            model_name='testrun',
            name='repeats',
            field=models.PositiveIntegerField(default=1, help_text='How many times each case asks the model; it passes only when every repeat passes (pass^N). With the cache on, only the first repeat may be answered from it; the others always ask the model.', validators=[django.core.validators.MinValueValidator(1), django.core.validators.MaxValueValidator(20)]),
        ),
        migrations.AlterField(
            model_name='testrun',
            name='timeout_seconds',
            field=models.FloatField(default=60, validators=[django.core.validators.MinValueValidator(1), django.core.validators.MaxValueValidator(3600)]),
        ),
    ]
