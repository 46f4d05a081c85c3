//! Groups (SPEC §7) and the queries fleets need across keys: a group's members and spend,
//! a key's descendants and their spend. Both backends implement the same methods.

use crate::keys::BudgetMode;
use crate::money::Nanos;

/// A group of keys with a monthly budget and an rpm over the sum of its keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRecord {
    pub name: String,
    pub budget: Option<Nanos>,
    pub budget_mode: BudgetMode,
    pub rpm: Option<u32>,
    pub created_at: i64,
}

/// Changes to a group: `None` leaves a field alone, `Some(None)` clears a limit.
#[derive(Debug, Clone, Default)]
pub struct GroupPatch {
    pub budget: Option<Option<Nanos>>,
    pub budget_mode: Option<BudgetMode>,
    pub rpm: Option<Option<u32>>,
}

impl GroupPatch {
    pub fn apply(&self, g: &mut GroupRecord) {
        if let Some(v) = self.budget {
            g.budget = v;
        }
        if let Some(v) = self.budget_mode {
            g.budget_mode = v;
        }
        if let Some(v) = self.rpm {
            g.rpm = v;
        }
    }
}

/// The recursive set of a key's descendants (`?1`/`$1` is the ancestor's id), as a CTE both
/// SQLite and PostgreSQL accept.
macro_rules! descendants_cte {
    ($p:literal) => {
        concat!(
            "WITH RECURSIVE tree(id) AS (SELECT id FROM keys WHERE parent_id = ",
            $p,
            " UNION SELECT k.id FROM keys k JOIN tree ON k.parent_id = tree.id) "
        )
    };
}
pub(super) use descendants_cte;
