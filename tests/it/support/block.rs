//! The managed block the agent writes into authorized_keys (DESIGN.md §4),
//! as the tests read and write it: the markers, a block as the agent must
//! render it, and a file's lines split into inside and outside the block.

/// The first line of the managed block.
pub const BEGIN: &str = "# BEGIN keysync managed keys: edits inside this block are overwritten";
/// The last line of the managed block.
pub const END: &str = "# END keysync managed keys";

/// The block as the agent must write it.
pub fn block(keys: &[String]) -> String {
    let mut out = format!("{BEGIN}\n");
    for k in keys {
        out.push_str(k);
        out.push('\n');
    }
    out.push_str(END);
    out.push('\n');
    out
}

/// The lines of `content` inside (`true`) or outside (`false`) the managed block.
fn lines_where(content: &str, inside_block: bool) -> Vec<&str> {
    let mut inside = false;
    let mut out = Vec::new();
    for line in content.lines() {
        if line.starts_with("# BEGIN keysync managed keys") {
            inside = true;
        } else if line.starts_with("# END keysync managed keys") {
            inside = false;
        } else if inside == inside_block {
            out.push(line);
        }
    }
    out
}

/// The keys (lines) inside the managed block of a file's content.
pub fn block_keys(content: &str) -> Vec<String> {
    lines_where(content, true)
        .into_iter()
        .map(str::to_string)
        .collect()
}

/// The lines of `content` outside the managed block, in order.
pub fn outside_block(content: &str) -> Vec<&str> {
    lines_where(content, false)
}
