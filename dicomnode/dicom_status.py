"""DIMSE status codes the node answers or reads (PS3.7 Annex C, PS3.4 Annexes B and C): one definition.

Names follow the standard's wording; the service each belongs to is in the comment.
"""

from __future__ import annotations

SUCCESS = 0x0000
PENDING = 0xFF00                  # C-FIND/C-MOVE/C-GET: matches or sub-operations are continuing
PENDING_WARNING = 0xFF01          # C-FIND: pending, one or more optional keys were not supported
CANCEL = 0xFE00                   # matching / sub-operations terminated due to a C-CANCEL
WARNING_SUB_OPERATIONS = 0xB000   # C-MOVE/C-GET: one or more sub-operations failed
NOT_AUTHORIZED = 0x0124           # Refused: not authorized
SOP_CLASS_NOT_SUPPORTED = 0x0122  # Refused: SOP class not supported
OUT_OF_RESOURCES = 0xA700         # C-STORE / C-FIND: refused, out of resources
OUT_OF_RESOURCES_SUB_OPERATIONS = 0xA702  # C-MOVE/C-GET: unable to perform sub-operations
MOVE_DESTINATION_UNKNOWN = 0xA801  # C-MOVE: refused, move destination unknown
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # C-STORE: error, data set does not match SOP class
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # C-FIND/C-MOVE/C-GET: identifier does not match SOP class
UNABLE_TO_PROCESS = 0xC000        # C-FIND/C-MOVE/C-GET: unable to process
# C-STORE "Cannot understand" (0xCxxx) codes the node uses, one per cause (documented in README):
CANNOT_DECODE = 0xC210            # the dataset does not decode or is structurally broken / truncated
INVALID_UID = 0xC220              # a required UID is missing or not a valid UID
DUPLICATE_REJECTED = 0xC230       # duplicate SOP Instance UID refused (duplicate_policy: reject)
INDEX_FAILED = 0xC240             # the index write failed (the file is removed again)

PENDING_CODES = (PENDING, PENDING_WARNING)
