-- Order analytics per merchant for one window: the sample pipeline SQL.
--
-- Input: table `orders`, one row per change event of the business database's
-- `orders` table in the window, with columns
--   id (Int64), merchant_id (Utf8), amount (Int64, cents), user_id (Utf8),
--   item (Utf8), status (Utf8: 'paid' or 'refunded'), created_at (Utf8)
-- and the meta columns _event_id, _op ('INSERT' / 'UPDATE' / 'DELETE') and
-- _event_time_ms that the worker adds to every table.
--
-- Output: one row per merchant with at least one order placed in the window:
--   merchant_id, gmv, orders, paid_orders, paying_users, avg_order_value,
--   refunds, refund_amount, top_items
-- The worker requires the final statement to output `merchant_id` (once per
-- merchant); every other column becomes a metric.

-- Orders placed in the window. A later change to an order (its refund, a
-- corrected amount) arrives as an UPDATE event in whatever window it happens
-- in, and a removal as a DELETE: this sample counts each order once, as it was
-- placed, so only INSERT events are considered.
CREATE VIEW placed AS
SELECT id, merchant_id, amount, user_id, item, status
FROM orders
WHERE _op = 'INSERT';

-- Paid orders per merchant and item.
CREATE VIEW item_sales AS
SELECT merchant_id, item, COUNT(*) AS paid
FROM placed
WHERE status = 'paid'
GROUP BY merchant_id, item;

-- Each merchant's items ranked by paid orders; ties go to the item name that
-- sorts first (byte order), so the ranking is total and deterministic.
CREATE VIEW item_rank AS
SELECT merchant_id,
       item,
       ROW_NUMBER() OVER (PARTITION BY merchant_id ORDER BY paid DESC, item ASC) AS item_rank
FROM item_sales;

-- Up to three best sellers per merchant, in rank order.
CREATE VIEW top_items AS
SELECT merchant_id,
       string_agg(item, ',' ORDER BY item_rank) AS top_items
FROM item_rank
WHERE item_rank <= 3
GROUP BY merchant_id;

-- Totals per merchant. The CASE expressions yield NULL for the other status,
-- which COUNT and SUM skip; COALESCE turns "no such order" into 0.
CREATE VIEW totals AS
SELECT merchant_id,
       COALESCE(SUM(CASE WHEN status = 'paid' THEN amount END), 0) AS gmv,
       COUNT(*) AS orders,
       COUNT(CASE WHEN status = 'paid' THEN 1 END) AS paid_orders,
       COUNT(DISTINCT CASE WHEN status = 'paid' THEN user_id END) AS paying_users,
       COUNT(CASE WHEN status = 'refunded' THEN 1 END) AS refunds,
       COALESCE(SUM(CASE WHEN status = 'refunded' THEN amount END), 0) AS refund_amount
FROM placed
GROUP BY merchant_id;

-- One row per merchant. A merchant without paid orders has no average order
-- value (NULL, not 0) and no top items ('').
SELECT t.merchant_id,
       t.gmv,
       t.orders,
       t.paid_orders,
       t.paying_users,
       CASE WHEN t.paid_orders > 0
            THEN CAST(t.gmv AS DOUBLE) / CAST(t.paid_orders AS DOUBLE)
       END AS avg_order_value,
       t.refunds,
       t.refund_amount,
       COALESCE(ti.top_items, '') AS top_items
FROM totals t
LEFT JOIN top_items ti ON ti.merchant_id = t.merchant_id;
