//! Aligned text tables, as `kubectl get` prints them: upper-case headers, each column as wide
//! as its widest cell, three spaces between columns, the last column not padded.

/// Renders `rows` under `headers`; a missing cell is empty, an empty cell is shown `-`.
pub fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    let cols = headers.len();
    let cell = |r: &Vec<String>, i: usize| -> String {
        match r.get(i).map(String::as_str) {
            None | Some("") => "-".to_string(),
            Some(s) => s.replace(['\n', '\t'], " "),
        }
    };
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, w) in widths.iter_mut().enumerate() {
            *w = (*w).max(cell(r, i).chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<String>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cols {
                l.push_str(c);
            } else {
                l.push_str(c);
                l.extend(std::iter::repeat_n(' ', widths[i] - c.chars().count() + 3));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line((0..cols).map(|i| cell(r, i)).collect());
    }
    out
}

/// A duration in seconds the short way: `45s`, `3m4s`, `5h2m`, `2d3h`.
pub fn human_secs(secs: u64) -> String {
    let (d, h, m, s) = (
        secs / 86_400,
        secs % 86_400 / 3600,
        secs % 3600 / 60,
        secs % 60,
    );
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s}s"),
        (0, _, _) => format!("{h}h{m}m"),
        _ => format!("{d}d{h}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(cells: &[&str]) -> Vec<String> {
        cells.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn columns_align_on_the_widest_cell() {
        let t = render(
            &["NAMESPACE", "NAME", "IP"],
            &[
                row(&["mesh", "node1-pod1", "198.19.1.2"]),
                row(&["kube-system", "a", ""]),
                row(&["x"]),
            ],
        );
        assert_eq!(
            t,
            "NAMESPACE     NAME         IP\n\
             mesh          node1-pod1   198.19.1.2\n\
             kube-system   a            -\n\
             x             -            -\n"
        );
        assert_eq!(render(&["A", "B"], &[]), "A   B\n");
    }

    #[test]
    fn cells_stay_on_one_line() {
        let t = render(&["A", "B"], &[row(&["x\ny", "z"])]);
        assert_eq!(t.lines().count(), 2, "{t}");
        assert!(t.contains("x y"));
    }

    #[test]
    fn durations() {
        assert_eq!(human_secs(0), "0s");
        assert_eq!(human_secs(59), "59s");
        assert_eq!(human_secs(184), "3m4s");
        assert_eq!(human_secs(86_399), "23h59m");
        assert_eq!(human_secs(183_600), "2d3h");
    }
}
