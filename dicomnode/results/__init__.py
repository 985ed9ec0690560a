"""Results into the hospital: SR and KOS documents of each classified series, routing rules by anatomy."""
